"""CAPO curvature mask (arXiv:2510.00819, reconstructed): keep token t iff s_t <= tau * mean_{c != 0}(s),
s_t = |c_t| ||h_t||^2 (1 - pi(y_t)), c_t = -A r (0 where clipped); kept tokens get the PPO-clip loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.loss.capo_curvature import CAPOCurvatureLoss
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import from_config, make_batch

F64 = torch.float64


def batch(old, adv, hidden, mask=None):
    old = torch.as_tensor(old, dtype=F64)
    B, T = old.shape
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    b = make_batch([0.0] * B, None, mask, advantages=torch.as_tensor(adv, dtype=F64) * mask, old_logprobs=old,
                   dtype=F64)
    return b.replace(extras={"hidden": torch.as_tensor(hidden, dtype=F64)})


def test_hand_case():
    # One row, 4 tokens, r = 1 (logp = old), A = 1 -> c = -1. pi = exp(logp) = [0.5, 0.5, 0.5, 0.9].
    # ||h||^2 = [1, 1, 16, 1] -> s = [0.5, 0.5, 8.0, 0.1], mean 2.275; tau = 2 -> bound 4.55: token 2 is rejected.
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.9]], dtype=F64))
    hidden = [[[1.0, 0.0], [0.0, 1.0], [4.0, 0.0], [0.6, 0.8]]]
    b = batch(logp, [[1.0] * 4], hidden)
    lp = logp.clone().requires_grad_(True)
    out = CAPOCurvatureLoss(threshold=2.0)(lp, b)
    assert_close(out.per_token, torch.tensor([[-1.0, -1.0, 0.0, -1.0]], dtype=F64))
    out.per_token.sum().backward()
    assert_close(lp.grad, torch.tensor([[-1.0, -1.0, 0.0, -1.0]], dtype=F64))  # masked token: no gradient
    assert_close(out.metrics["loss/capo_rejected"], torch.tensor(0.25))
    # tau = 4 -> bound 9.1: nothing rejected
    assert CAPOCurvatureLoss(threshold=4.0)(lp, b).metrics["loss/capo_rejected"].item() == 0.0


def test_card_property_infinite_threshold_is_grpo():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=g, dtype=F64) * 2
    b = batch(old, torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, 5, 4, generator=g, dtype=F64) * 3)
    lp = old + 0.3 * torch.randn(3, 5, generator=g, dtype=F64)
    x1, x2 = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    capo, ppo = CAPOCurvatureLoss(threshold=math.inf)(x1, b).per_token, PPOClipLoss()(x2, b).per_token
    assert torch.equal(capo, ppo)  # bit-identical values...
    capo.sum().backward()
    ppo.sum().backward()
    assert torch.equal(x1.grad, x2.grad)  # ...and gradients
    # without hidden states (outside the trainer) nothing is masked either
    assert_close(CAPOCurvatureLoss(threshold=0.01)(lp, b.replace(extras={})).per_token, PPOClipLoss()(lp, b).per_token)


def loop_capo(lp, old, adv, hidden, mask, tau, eps):
    B, T = len(lp), len(lp[0])
    ppo, score = {}, {}
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            r, a = math.exp(lp[i][t] - old[i][t]), adv[i][t]
            clipped = (a >= 0 and r > 1 + eps) or (a < 0 and r < 1 - eps)
            ppo[i, t] = -a * min(max(r, 1 - eps), 1 + eps) if clipped else -a * r
            c = 0.0 if clipped else -a * r
            if c != 0.0:  # only tokens that move the weights enter the mean
                score[i, t] = abs(c) * sum(x * x for x in hidden[i][t]) * (1 - math.exp(min(lp[i][t], 0.0)))
    mean = sum(score.values()) / len(score) if score else 0.0
    return torch.tensor([[ppo[i, t] if mask[i][t] and score.get((i, t), 0.0) <= tau * mean else 0.0 for t in range(T)]
                         for i in range(B)], dtype=F64)


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, H = 4, 5, 3
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2
    lp = old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, T, generator=g, dtype=F64)
    adv[1] = 0.0  # a zero-advantage row: its tokens stay out of the mean
    hidden = torch.randn(B, T, H, generator=g, dtype=F64) * torch.rand(B, T, 1, generator=g, dtype=F64) * 3
    out = CAPOCurvatureLoss(threshold=1.5)(lp, batch(old, adv, hidden, mask)).per_token
    ref = loop_capo(lp.tolist(), old.tolist(), (adv * mask).tolist(), hidden.tolist(), mask.tolist(), 1.5, 0.2)
    assert_close(out, ref)


def test_zero_advantage_groups_do_not_change_the_mask():
    # Hand case: row 0 as in test_hand_case, s = [0.5, 0.5, 8.0, 0.1], mean over contributing tokens 2.275; tau = 4 ->
    # bound 9.1: nothing rejected. Row 1 has A = 0 (an all-fail group): c = 0, s = 0, no gradient, so it stays out
    # of the mean. Averaging its 4 zero scores in would halve the mean to 1.1375 (bound 4.55) and reject token 2 --
    # the mask would depend on how many all-fail groups the batch holds.
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.9], [0.5, 0.5, 0.5, 0.5]], dtype=F64))
    hidden = [[[1.0, 0.0], [0.0, 1.0], [4.0, 0.0], [0.6, 0.8]], [[1.0, 0.0]] * 4]
    out = CAPOCurvatureLoss(threshold=4.0)(logp, batch(logp, [[1.0] * 4, [0.0] * 4], hidden))
    assert_close(out.per_token, torch.tensor([[-1.0] * 4, [0.0] * 4], dtype=F64))
    assert out.metrics["loss/capo_rejected"].item() == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_appending_zero_advantage_rows_keeps_the_mask(seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(8, 5, generator=g, dtype=F64) * 2
    lp = old + 0.3 * torch.randn(8, 5, generator=g, dtype=F64)
    adv = torch.randn(8, 5, generator=g, dtype=F64)
    adv[3:] = 0.0
    hid = torch.randn(8, 5, 3, generator=g, dtype=F64) * 2
    fn = CAPOCurvatureLoss(threshold=1.5)
    part = fn(lp[:3], batch(old[:3], adv[:3], hid[:3]))
    assert_close(fn(lp, batch(old, adv, hid)).per_token[:3], part.per_token)
    assert part.metrics["loss/capo_rejected"].item() > 0  # the threshold does bite here


def test_mask_off_trains_exactly_like_grpo(tmp_path):
    # End to end (tiny model, copy task, 3 steps): with the mask switched off the capo preset is the grpo preset --
    # same rewards at every step and the same final weights (hidden-state capture must not perturb anything).
    from lmpo.config import load_config
    from lmpo.train.loop import train

    def run(name, *extra):
        cfg = load_config("configs/tiny.yaml", [f"output.dir={tmp_path / name}", "train.steps=3", "eval.every=0",
                                                 "output.checkpoint_every=0", "output.progress=false", "output.plot=false", *extra])
        return train(cfg)

    a = run("grpo", "method=grpo")
    b = run("capo", "method=capo", "loss.threshold=1e300")
    keys = ("reward/mean", "loss/total", "loss/grad_norm", "loss/kl", "loss/entropy", "loss/clip_frac")
    steps_a, steps_b = ([h for h in r.history if "loss/total" in h] for r in (a, b))
    assert len(steps_a) == len(steps_b) == 3
    for ha, hb in zip(steps_a, steps_b):
        assert {k: ha[k] for k in keys} == {k: hb[k] for k in keys}  # exact, step by step
    assert a.eval_after == b.eval_after
    assert [h.get("loss/capo_rejected") for h in b.history if "loss/capo_rejected" in h] == [0.0] * 3


def test_gradcheck_kept_tokens_are_ppo():
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(2, 4, generator=g, dtype=F64)
    b = batch(old, torch.randn(2, 4, generator=g, dtype=F64), torch.randn(2, 4, 3, generator=g, dtype=F64))
    lp = (old + 0.05 * torch.randn(2, 4, generator=g, dtype=F64)).requires_grad_(True)
    fn = CAPOCurvatureLoss(threshold=1.0)
    assert torch.autograd.gradcheck(lambda x: fn(x, b).per_token.sum(), (lp,))


def test_config_errors():
    with pytest.raises(ConfigError, match="threshold"):
        from_config(CAPOCurvatureLoss, threshold=0.0)
    with pytest.raises(ConfigError, match="epsilon"):
        from_config(CAPOCurvatureLoss, epsilon=-1.0)
    assert "hidden_states" in CAPOCurvatureLoss.needs
