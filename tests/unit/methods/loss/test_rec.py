"""REC / REP / RED (arXiv:2509.24203): l_t = -w_t A_t log pi(y_t) 1[in range] + reg_t.

With w and the mask constants: d l_t / d logp_t = -w A 1[in range] + d reg_t / d logp_t, where
d(-c logp)/d logp = -c (forward_kl) and d(c (logp - old)^2)/d logp = 2 c (logp - old) (k2).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from lmpo.methods.loss.rec import CLIP_MODES, WEIGHTS, RECLoss
from lmpo.methods.loss.reinforce import ReinforceLoss
from factories import from_config, make_batch

F64 = torch.float64


def run(loss_fn, ratios, adv, mask=None, old=None):
    ratios = torch.as_tensor(ratios, dtype=F64)
    B, T = ratios.shape
    adv = torch.as_tensor(adv, dtype=F64)
    adv = adv[:, None].expand(B, T).clone() if adv.dim() == 1 else adv
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    old = torch.full((B, T), -1.0, dtype=F64) if old is None else old
    old = old.clone().requires_grad_(True)
    b = make_batch([0.0] * B, None, mask, advantages=adv * mask, old_logprobs=old, dtype=F64)
    lp = (old.detach() + ratios.log()).requires_grad_(True)
    out = loss_fn(lp, b)
    out.per_token.sum().backward()
    assert old.grad is None
    return out.per_token.detach(), lp.grad, out.metrics


def test_hand_card_masks():
    # Card worked example, eps = 0.2, eps'_l = 0.6 (ring inner threshold 0.4), old = -1 so logp = -1 + log rho.
    # tokens: (A, rho) = (+1, 1.3), (-1, 1.3), (+1, 0.5), (+1, 0.3); grad = -A * 1[kept] (weight none)
    #   one_side: masked | kept | kept | kept            -> [0, 1, -1, -1]
    #   two_side: masked | masked | masked | masked      -> [0, 0, 0, 0]
    #   ring:     masked (1.3 <= 2 outer? A > 0 needs rho <= 0.4) | masked (A < 0 needs rho >= 3) | masked | kept
    #             -> [0, 0, 0, -1]
    #   none:     all kept                               -> [-1, 1, -1, -1]
    r, a = [[1.3, 1.3, 0.5, 0.3]], [[1.0, -1.0, 1.0, 1.0]]
    expect = {"one_side": [0, 1, -1, -1], "two_side": [0, 0, 0, 0], "ring": [0, 0, 0, -1], "none": [-1, 1, -1, -1]}
    for mode, g in expect.items():
        loss, grad, m = run(RECLoss(clip_mode=mode), r, a)
        assert_close(grad, torch.tensor([g], dtype=F64), msg=mode)
        # value: -A log pi on kept tokens, log pi = -1 + log rho
        lp = [-1 + math.log(x) for x in r[0]]
        assert_close(loss, torch.tensor([[-ai * li * (gi != 0) for ai, li, gi in zip(a[0], lp, g)]], dtype=F64))
        assert_close(m["loss/clip_frac"], torch.tensor(sum(gi == 0 for gi in g) / 4.0))


def test_hand_weights_and_regularisers():
    # one token, A = -2, rho = 1.5 (old = -1, logp = -1 + ln 1.5 = -0.59453), clip_mode none:
    #   importance_sampling: w = 1.5 -> grad = -w A = 3.0
    #   truncated_is (0.4, 3.0): 1.5 inside -> 3.0;  rho = 4 -> w = 3 -> grad = 6
    #   advantage (temp 2): w = exp(-1) -> grad = 2 e^-1
    #   k2, c = 0.5, weight none: grad = 2 + 2 * 0.5 * ln 1.5 = 2.405465;  forward_kl c = 0.5: grad = 2 - 0.5 = 1.5
    def g(**kw):
        return run(RECLoss(clip_mode="none", **kw), [[1.5]], [-2.0])[1].item()
    assert g(weight="importance_sampling") == pytest.approx(3.0)
    assert g(weight="truncated_is") == pytest.approx(3.0)
    assert run(RECLoss(clip_mode="none", weight="truncated_is"), [[4.0]], [-2.0])[1].item() == pytest.approx(6.0)
    assert g(weight="advantage", temp=2.0) == pytest.approx(2 * math.exp(-1))
    assert g(regularizer="k2", regularizer_coef=0.5) == pytest.approx(2 + math.log(1.5))
    assert g(regularizer="forward_kl", regularizer_coef=0.5) == pytest.approx(1.5)
    # k2 value: -A logp + c d^2 = 2 (-0.59453) + 0.5 ln(1.5)^2
    loss = run(RECLoss(clip_mode="none", regularizer="k2", regularizer_coef=0.5), [[1.5]], [-2.0])[0].item()
    assert loss == pytest.approx(2 * (-1 + math.log(1.5)) + 0.5 * math.log(1.5) ** 2)


def test_hand_gspo_one_side():
    # eps 3e-4 / 4e-4 style band with eps = 0.1: row of two tokens, rho = [1.5, 0.8] -> mean log = 0.5 ln 1.2
    #   -> sequence ratio sqrt(1.2) = 1.0954 > 1.1? no -> A = +1 kept on both tokens (token 1.5 alone would be cut).
    #   rho = [2.0, 0.8]: sqrt(1.6) = 1.2649 > 1.1 -> both tokens masked.
    loss_fn = RECLoss(clip_mode="gspo_one_side", epsilon=0.1)
    assert_close(run(loss_fn, [[1.5, 0.8]], [1.0])[1], torch.tensor([[-1.0, -1.0]], dtype=F64))
    assert_close(run(loss_fn, [[2.0, 0.8]], [1.0])[1], torch.tensor([[0.0, 0.0]], dtype=F64))
    # gspo_importance_sampling weight = sequence ratio sqrt(1.2)
    g = run(RECLoss(clip_mode="none", weight="gspo_importance_sampling"), [[1.5, 0.8]], [1.0])[1]
    assert_close(g, torch.full((1, 2), -math.sqrt(1.2), dtype=F64))


def random_inputs(seed, eps=0.2):
    g = torch.Generator().manual_seed(seed)
    B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
    logr = torch.randn(B, T, generator=g, dtype=F64) * 0.6
    r = logr.exp()
    kinks = torch.tensor([1 - eps, 1 + eps, 0.4, 3.0], dtype=F64)
    near = ((r[..., None] - kinks).abs() < 1e-3).any(-1)
    logr = torch.where(near, torch.zeros_like(logr), logr)
    adv = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    return logr.exp(), adv * mask, mask


def test_card_properties():
    for seed in range(6):
        r, adv, mask = random_inputs(seed)
        # (a) none / none / no regulariser = REINFORCE with the same advantages
        _, g_rec, _ = run(RECLoss(clip_mode="none"), r, adv, mask)
        _, g_rf, _ = run(ReinforceLoss(), r, adv, mask)
        assert_close(g_rec, g_rf)
        # (c) forward_kl with coef c = REINFORCE with advantages A + c (on trained tokens)
        _, g_fkl, _ = run(RECLoss(clip_mode="none", regularizer="forward_kl", regularizer_coef=0.3), r, adv, mask)
        _, g_shift, _ = run(ReinforceLoss(), r, (adv + 0.3) * mask, mask)
        assert_close(g_fkl, g_shift)
        # REC-OneSide-IS has exactly GRPO's (PPO-clip) gradient
        _, g_is, _ = run(RECLoss(clip_mode="one_side", weight="importance_sampling"), r, adv, mask)
        _, g_ppo, _ = run(PPOClipLoss(epsilon=0.2), r, adv, mask)
        assert_close(g_is, g_ppo)


def test_config_errors():
    with pytest.raises(ConfigError, match="loss.clip_mode"):
        from_config(RECLoss, clip_mode="one-side")
    with pytest.raises(ConfigError, match="loss.weight"):
        from_config(RECLoss, weight="is")
    with pytest.raises(ConfigError, match="loss.regularizer"):
        from_config(RECLoss, regularizer="kl")
    with pytest.raises(ConfigError, match="loss.epsilon"):
        from_config(RECLoss, epsilon=0.0)
    with pytest.raises(ConfigError, match="loss.regularizer_coef"):
        from_config(RECLoss, regularizer_coef=-1.0)
    with pytest.raises(ConfigError, match="loss.temp"):
        from_config(RECLoss, temp=0.0)


# --------------------------------------------------------------------------- loop reference
def loop_rec(logr, adv, mask, old, cfg):
    el, eh = cfg["epsilon"], cfg["epsilon"]
    elp, ehp = 0.6, 2.0
    B, T = len(logr), len(logr[0])
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        toks = [t for t in range(T) if mask[i][t]]
        s = math.exp(sum(logr[i][t] for t in toks) / len(toks))
        for t in toks:
            r, a, lp = math.exp(logr[i][t]), adv[i][t], old[i][t] + logr[i][t]
            band = 1 - el <= r <= 1 + eh
            keep = {"none": True, "two_side": band,
                    "one_side": (a >= 0 and r <= 1 + eh) or (a <= 0 and r >= 1 - el),
                    "ring": band or (a >= 0 and r <= 1 - elp) or (a <= 0 and r >= 1 + ehp),
                    "gspo_one_side": (a >= 0 and s <= 1 + eh) or (a <= 0 and s >= 1 - el)}[cfg["clip_mode"]]
            w = {"none": 1.0, "importance_sampling": r, "truncated_is": min(max(r, 1 - elp), 1 + ehp),
                 "gspo_importance_sampling": s, "advantage": math.exp(a / cfg["temp"])}[cfg["weight"]]
            l, g = (-w * a * lp, -w * a) if keep else (0.0, 0.0)
            c = cfg["coef"]
            if cfg["regularizer"] == "forward_kl":
                l, g = l - c * lp, g - c
            elif cfg["regularizer"] == "k2":
                l, g = l + c * logr[i][t] ** 2, g + 2 * c * logr[i][t]
            loss[i][t], grad[i][t] = l, g
    return torch.tensor(loss, dtype=F64), torch.tensor(grad, dtype=F64)


CONFIGS = [dict(clip_mode=c, weight=w, regularizer="none", coef=0.0) for c in CLIP_MODES for w in WEIGHTS] + [
    dict(clip_mode="one_side", weight="none", regularizer="k2", coef=0.1),
    dict(clip_mode="ring", weight="truncated_is", regularizer="forward_kl", coef=0.1)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_matches_loop_reference(cfg):
    cfg = {**cfg, "epsilon": 0.2, "temp": 0.7}
    loss_fn = RECLoss(clip_mode=cfg["clip_mode"], weight=cfg["weight"], regularizer=cfg["regularizer"],
                      regularizer_coef=cfg["coef"], temp=cfg["temp"])
    for seed in range(5):
        r, adv, mask = random_inputs(seed)
        old = -torch.rand(r.shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2
        loss, grad, _ = run(loss_fn, r, adv, mask, old=old)
        ref_loss, ref_grad = loop_rec(r.log().tolist(), adv.tolist(), mask.tolist(), old.tolist(), cfg)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)


def test_gradcheck_through_aggregator_penalty_only():
    # With clip_mode none and weight none nothing is held constant, so float64 finite differences apply exactly:
    # REP-OPMD l = -A logp + c (logp - old)^2 through the token-mean aggregator.
    r, adv, mask = random_inputs(11)
    old = -torch.rand(r.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    b = make_batch([0.0] * r.shape[0], None, mask, advantages=adv, old_logprobs=old, dtype=F64)
    loss_fn, agg = RECLoss(clip_mode="none", regularizer="k2", regularizer_coef=0.1), TokenMean()
    norm = agg.normaliser(mask, 0)
    x = (old + r.log()).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: agg(loss_fn(z, b).per_token, mask, norm), (x,))
