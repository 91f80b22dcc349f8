"""EPO (arXiv:2509.22576): PPO surrogate + entropy bonus + differentiable entropy-band penalty.

Per token: l = ppo - lam * H + lam * c * w * alpha * (relu(kl * Hbar - H) + relu(H - kr * Hbar)), Hbar from the
history of previous optimizer steps (per turn). dl/dH = -lam - lam c w alpha (below band) / + lam c w alpha (above).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.loss.epo import EPOLoss, phase_weight
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import from_config, make_batch

F64 = torch.float64


def batch_with(ent, adv, mask=None, turns=None, old=None):
    ent = torch.as_tensor(ent, dtype=F64)
    B, T = ent.shape
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    old = torch.full((B, T), -1.0, dtype=F64) if old is None else old
    b = make_batch([0.0] * B, None, mask, advantages=torch.as_tensor(adv, dtype=F64) * mask, old_logprobs=old,
                   dtype=F64)
    extras = {"current_entropy": ent.clone().requires_grad_(True)}
    return b.replace(extras=extras, turn_ids=None if turns is None else torch.as_tensor(turns)), extras


def seed_history(loss, turn_means):
    """Commit a history where turn k has mean entropy turn_means[k] (one token each, one optimizer step)."""
    for k, h in turn_means.items():
        loss.state["pending"][k] = (h, 1)
    loss.after_optimizer_step()
    loss.state["iters"] = 0  # keep the phase weight at w(0) = 1 for the hand cases


def test_card_example_hinge_penalty_and_gradient():
    # Card (b): Hbar = 1, kappa = (0.5, 1.5), alpha = 0.1, H = [0.4, 1.0, 1.6], zero advantage (ppo term 0).
    # hinge = [0.5 - 0.4, 0, 1.6 - 1.5] = [0.1, 0, 0.1] -> penalty alpha * hinge = [0.01, 0, 0.01], mean 0.02/3.
    # lam = 1, c = 1, w = 1: l = -H + penalty = [-0.39, -1.0, -1.59];
    # dl/dH = [-1 - 0.1, -1, -1 + 0.1] = [-1.1, -1.0, -0.9] (the middle token gets no penalty gradient).
    loss = EPOLoss(entropy_coef=1.0, kappa_low=0.5, kappa_high=1.5, out_penalty=0.1, schedule_iters=0)
    seed_history(loss, {0: 1.0})
    b, ex = batch_with([[0.4, 1.0, 1.6]], [[0.0, 0.0, 0.0]])
    lp = torch.full((1, 3), -1.0, dtype=F64, requires_grad=True)
    out = loss(lp, b)
    assert_close(out.per_token, torch.tensor([[-0.39, -1.0, -1.59]], dtype=F64))
    out.per_token.sum().backward()
    assert_close(ex["current_entropy"].grad, torch.tensor([[-1.1, -1.0, -0.9]], dtype=F64))
    assert_close(out.metrics["loss/epo_penalty"], torch.tensor(0.02 / 3, dtype=F64))
    assert_close(out.metrics["loss/epo_out_of_band"], torch.tensor(2 / 3))


def test_card_property_unbounded_band_is_ppo_plus_entropy_bonus():
    # kappa_l = 0, kappa_r = inf: no token is ever out of band, so l = ppo - lam * H exactly.
    g = torch.Generator().manual_seed(0)
    ent = torch.rand(3, 4, generator=g, dtype=F64) * 3
    adv = torch.randn(3, 4, generator=g, dtype=F64)
    b, _ = batch_with(ent, adv, mask=[[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    lp = -torch.rand(3, 4, generator=g, dtype=F64)
    loss = EPOLoss(entropy_coef=0.3, kappa_low=0.0, kappa_high=math.inf, out_penalty=5.0)
    seed_history(loss, {0: 0.01})
    ref = PPOClipLoss(epsilon=0.2)(lp, b).per_token - 0.3 * torch.where(b.response_mask, ent, 0.0)
    assert_close(loss(lp, b).per_token, ref)


def test_history_is_cumulative_per_turn_and_excludes_the_current_step():
    loss = EPOLoss(entropy_coef=1.0, kappa_low=0.5, kappa_high=1.5, out_penalty=1.0, schedule_iters=0)
    lp = torch.full((2, 2), -1.0, dtype=F64)
    # Step 1: no history -> no penalty at all; it records turn 0: [2, 4] and turn 1: [1] (token [1,1] is masked).
    b, _ = batch_with([[2.0, 1.0], [4.0, 9.0]], [[0, 0], [0, 0]], mask=[[1, 1], [1, 0]], turns=[[0, 1], [0, 1]])
    assert_close(loss(lp, b).per_token, -torch.tensor([[2.0, 1.0], [4.0, 0.0]], dtype=F64))
    assert loss.history_mean(torch.tensor([0, 1]))[1].tolist() == [False, False]  # nothing committed yet
    loss.after_optimizer_step()
    # Step 2 records turn 0: [0] -> after commit Hbar_0 = (2 + 4 + 0) / 3 = 2, Hbar_1 = 1.
    b2, _ = batch_with([[0.0]], [[0.0]], turns=[[0]])
    loss(lp[:1, :1], b2)
    loss.after_optimizer_step()
    hbar, known = loss.history_mean(torch.tensor([0, 1, 7]))
    assert_close(hbar, torch.tensor([2.0, 1.0, 0.0], dtype=F64)) and known.tolist() == [True, True, False]
    # state round trip
    other = EPOLoss()
    other.load_state_dict(loss.state_dict())
    assert_close(other.history_mean(torch.tensor([0, 1]))[0], hbar[:2]) and other.state["iters"] == 2


def test_phase_weight_matches_code_schedule():
    # E = 150: w(0) = 1; w(75-) -> 1 - 0.2 (1 - e^-2) ~ 0.8271; w(75) = 0.8; w(150) = 0.8 e^-3 ~ 0.0398.
    assert phase_weight(0, 150) == 1.0
    assert phase_weight(74.999, 150) == pytest.approx(1 - 0.2 * (1 - math.exp(-2)), rel=1e-4)
    assert phase_weight(75, 150) == pytest.approx(0.8)
    assert phase_weight(150, 150) == pytest.approx(0.8 * math.exp(-3))
    assert phase_weight(500, 0) == 1.0


# --------------------------------------------------------------------------- loop reference
def loop_epo(lp, old, adv, ent, mask, turns, hist, lam, c, w, kl, kr, alpha, min_turn, eps):
    B, T = len(lp), len(lp[0])
    out = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            r, a = math.exp(lp[i][t] - old[i][t]), adv[i][t]
            ppo = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
            k, h = turns[i][t], ent[i][t]
            pen = 0.0
            if k in hist and k >= min_turn:
                hb = hist[k]
                pen = alpha * (max(0.0, kl * hb - h) + max(0.0, h - kr * hb))
            out[i][t] = ppo - lam * h + lam * c * w * pen
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 5
    ent = torch.rand(B, T, generator=g, dtype=F64) * 2
    adv = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.2
    turns = torch.randint(0, 3, (B, T), generator=g)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2
    lp = old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    loss = EPOLoss(entropy_coef=0.5, smooth_coef=0.7, kappa_low=0.6, kappa_high=1.3, out_penalty=0.2,
                   schedule_iters=10, smooth_min_turn=1)
    hist = {0: 0.8, 2: 1.1}  # turn 1 has no history
    seed_history(loss, hist)
    loss.state["iters"] = 3
    b, _ = batch_with(ent, adv, mask=mask, turns=turns, old=old)
    ref = loop_epo(lp.tolist(), old.tolist(), (adv * mask).tolist(), ent.tolist(), mask.tolist(), turns.tolist(), hist,
                   0.5, 0.7, phase_weight(3, 10), 0.6, 1.3, 0.2, 1, 0.2)
    assert_close(loss(lp, b).per_token, ref)


def test_gradcheck_logprobs_and_entropy():
    g = torch.Generator().manual_seed(3)
    B, T = 3, 4
    ent = (torch.rand(B, T, generator=g, dtype=F64) * 2).requires_grad_(True)
    old = -torch.rand(B, T, generator=g, dtype=F64)
    lp = (old + 0.1 * torch.randn(B, T, generator=g, dtype=F64)).requires_grad_(True)
    adv = torch.randn(B, T, generator=g, dtype=F64)
    loss = EPOLoss(entropy_coef=0.4, kappa_low=0.7, kappa_high=1.2, out_penalty=0.3, schedule_iters=0)
    seed_history(loss, {0: 1.0})
    b, _ = batch_with(ent.detach(), adv, old=old)
    ent_kinks = ((ent - 0.7).abs() < 1e-3) | ((ent - 1.2).abs() < 1e-3)
    assert not ent_kinks.any()

    def f(x, h):
        return loss(x, b.replace(extras={"current_entropy": h})).per_token.sum()

    assert torch.autograd.gradcheck(f, (lp, ent))


def test_without_entropy_it_is_the_clipped_surrogate():
    b, _ = batch_with([[1.0, 2.0]], [[1.0, -1.0]])
    b = b.replace(extras={})
    lp = torch.tensor([[-0.8, -1.3]], dtype=F64)
    assert_close(EPOLoss()(lp, b).per_token, PPOClipLoss()(lp, b).per_token)


def test_config_errors():
    for kw, key in (({"entropy_coef": -1}, "entropy_coef"), ({"kappa_low": 2.0, "kappa_high": 1.0}, "kappa_high"),
                    ({"out_penalty": -0.1}, "out_penalty"), ({"schedule_iters": -1}, "schedule_iters")):
        with pytest.raises(ConfigError, match=key):
            from_config(EPOLoss, **kw)
    assert "current_entropy" in EPOLoss.needs


def test_multi_turn_episode_batch_keeps_a_history_per_turn_of_policy_tokens():
    """A batch laid out by rollout.mode: episodes: observation tokens (entropy 50, never trained) and padding carry
    a turn id but no entropy is recorded or penalised there; each turn's band uses that turn's own history."""
    from factories import episode_batch

    loss = EPOLoss(entropy_coef=1.0, smooth_coef=1.0, kappa_low=0.5, kappa_high=1.5, out_penalty=1.0,
                   schedule_iters=0)
    # rows: [P0 P0 O0 P1] and [P0 O0 P1 pad]; zero advantages at ratio 1, so the surrogate term is 0
    b = episode_batch([[0.0, 1.0], [1.0, 0.0]], tokens=[[2, 1], [1, 1]])
    assert b.turn_ids.tolist() == [[0, 0, 0, 1], [0, 0, 1, 0]]
    mask = b.response_mask
    old = torch.full((2, 4), -1.0, dtype=F64)
    lp = old.clone()

    def step(ent):
        e = torch.tensor(ent, dtype=F64, requires_grad=True)
        batch = b.replace(advantages=torch.zeros(2, 4, dtype=F64), old_logprobs=old, extras={"current_entropy": e})
        return loss(lp, batch).per_token, e

    # step 1: no history, pure bonus -H on policy tokens; records turn 0 = {1, 3, 2} (mean 2), turn 1 = {2, 4} (3)
    out, _ = step([[1.0, 3.0, 50.0, 2.0], [2.0, 50.0, 4.0, 0.0]])
    assert_close(out, -torch.tensor([[1.0, 3.0, 0.0, 2.0], [2.0, 0.0, 4.0, 0.0]], dtype=F64))
    loss.after_optimizer_step()
    hbar, known = loss.history_mean(torch.tensor([0, 1]))
    assert_close(hbar, torch.tensor([2.0, 3.0], dtype=F64)) and known.all()  # one pooled mean would be 2.4
    # step 2: bands turn 0 = [1, 3], turn 1 = [1.5, 4.5]; hinges: 0.5 (below), 0.5 (above), 0.5 (5 > 4.5),
    # in band (2 in [1, 3]), 0.5 (1 < 1.5); per token -H + hinge; dl/dH = -1 in band, -2 below, 0 above
    out, e = step([[0.5, 3.5, 50.0, 5.0], [2.0, 50.0, 1.0, 0.0]])
    assert_close(out, torch.tensor([[0.0, -3.0, 0.0, -4.5], [-2.0, 0.0, -0.5, 0.0]], dtype=F64))
    out.sum().backward()
    assert_close(e.grad, torch.tensor([[-2.0, 0.0, 0.0, 0.0], [-1.0, 0.0, -2.0, 0.0]], dtype=F64))
    assert not (out[~mask] != 0).any()
