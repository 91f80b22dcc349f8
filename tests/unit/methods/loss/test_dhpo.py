"""DHPO hybrid ratio (arXiv:2601.05607, reconstructed).

r_t token ratio, s_i = exp(mean_t log r_t); branch clips r~ = clip(r, 1-et, 1+eth), s~ = clip(s, 1-es, 1+esh);
rho = M(r, s; w), rho~ = M(r~, s~; w) with M geometric r^w s^(1-w) or arithmetic w r + (1-w) s;
l_t = max(-A rho, -A rho~).  Gradient (s in GSPO-token form: d s / d logp_t = s): where the unclipped branch wins,
geometric d l / d logp_t = -A rho; arithmetic -A (w r + (1-w) s); where the clipped mixture wins, only the
unclipped parts of the mixture carry gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import lmpo.methods  # noqa: F401
from lmpo.errors import ConfigError, DataError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.dhpo import DHPOLoss
from lmpo.registry import LOSSES
from factories import from_config, make_batch, random_full_batch, run_token_loss

F64 = torch.float64


def run(loss_fn, logr, adv, mask=None, entropy=None):
    extras = None if entropy is None else {"current_entropy": torch.as_tensor(entropy, dtype=F64)}
    return run_token_loss(loss_fn, logr, adv, mask, old=-1.5, extras=extras)


def test_hand_average_geometric_and_arithmetic():
    # One response, A = +1, log r = [log 1.5, log(1/1.5)] -> s = exp(0) = 1.
    # Token clip 0.2: r~ = [1.2, 0.8]; seq clip 3e-4/4e-4: s~ = 1.  w = 0.5:
    #  geometric: rho = [sqrt(1.5), sqrt(1/1.5)] = [1.224745, 0.816497]; rho~ = [sqrt(1.2), sqrt(0.8)]
    #   token 0: -A rho = -1.224745 < -A rho~ = -1.095445 -> clipped side wins: l = -1.095445; gradient only through
    #   s (unclipped branch, s~ = s is inside its range... s = 1 within [1-3e-4, 1+4e-4]) -> d/dlogp = -rho~ * 0.5
    #   token 1: -0.816497 vs -sqrt(0.8) = -0.894427 -> unclipped wins: l = -0.816497, grad -A rho = -0.816497
    #  arithmetic: rho = [1.25, 0.8333], rho~ = [1.1, 0.9]: token 0 -> l = -1.1, grad = -0.5 * s = -0.5;
    #   token 1 -> l = -0.8333, grad = -(0.5 * (1/1.5) + 0.5 * 1) = -0.8333
    logr = [[math.log(1.5), -math.log(1.5)]]
    loss, grad, _ = run(DHPOLoss(), logr, [1.0])
    assert_close(loss, torch.tensor([[-math.sqrt(1.2), -math.sqrt(1 / 1.5)]], dtype=F64))
    assert_close(grad, torch.tensor([[-0.5 * math.sqrt(1.2), -math.sqrt(1 / 1.5)]], dtype=F64))
    loss, grad, _ = run(DHPOLoss(combine="arithmetic"), logr, [1.0])
    assert_close(loss, torch.tensor([[-1.1, -(0.5 / 1.5 + 0.5)]], dtype=F64))
    assert_close(grad, torch.tensor([[-0.5, -(0.5 / 1.5 + 0.5)]], dtype=F64))


def _inputs(seed):
    b = random_full_batch(seed=seed)
    g = torch.Generator().manual_seed(seed)
    lp = (b.old_logprobs + 0.3 * torch.randn(b.old_logprobs.shape, generator=g)) * b.response_mask
    return b, lp


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("combine", ["geometric", "arithmetic"])
def test_card_endpoints_equal_registered_ppo_clip_and_gspo_exactly(seed, combine):
    b, lp0 = _inputs(seed)
    for w, other in ((1.0, LOSSES.build("ppo_clip", epsilon=0.2, epsilon_high=0.28)),
                     (0.0, LOSSES.build("gspo", epsilon=3e-4, epsilon_high=4e-4))):
        mine = DHPOLoss(epsilon=0.2, epsilon_high=0.28, seq_epsilon=3e-4, seq_epsilon_high=4e-4, weight=w,
                        combine=combine)
        outs = []
        for fn in (mine, other):
            lp = lp0.clone().requires_grad_(True)
            out = fn(lp, b)
            out.per_token.sum().backward()
            outs.append((out.per_token.detach(), lp.grad))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_card_equal_token_ratios_give_that_ratio_for_any_w_and_branch_clips_bound_outliers():
    # all token ratios of a response equal c -> r = s = c and the hybrid is c for any w (inside both ranges)
    c = 1.0001
    for w in (0.0, 0.3, 0.7, 1.0):
        loss, _, m = run(DHPOLoss(weight=w), [[math.log(c)] * 3], [-1.0])
        assert_close(loss, torch.full((1, 3), c, dtype=F64))
    # an extreme token ratio (50) is clipped in its branch before mixing: with A > 0 the loss never goes below
    # -(max of the branch upper bounds) = -1.2
    loss, _, _ = run(DHPOLoss(weight=0.5), [[math.log(50.0), 0.0, 0.0]], [1.0])
    assert loss.min().item() >= -1.2


def test_entropy_mixing_weight():
    # entropies [2, 1, 0, pad] -> w = [1, 0.5, 0]: token 0 is pure GRPO, token 2 pure GSPO.
    # log r = [0.1, 0.2, 0.3] (no clipping with wide ranges; A = +1, geometric):
    #  s = exp(0.2); rho_t = exp(w_t * logr_t + (1 - w_t) * 0.2) -> [exp(0.1), exp(0.2), exp(0.2)]
    fn = DHPOLoss(mixing="entropy", epsilon=0.9, epsilon_high=9.0, seq_epsilon=0.9, seq_epsilon_high=9.0)
    loss, grad, m = run(fn, [[0.1, 0.2, 0.3, 0.0]], [1.0], [[1, 1, 1, 0]], entropy=[[2.0, 1.0, 0.0, 5.0]])
    expect = -torch.tensor([[math.exp(0.1), math.exp(0.2), math.exp(0.2), 0.0]], dtype=F64)
    assert_close(loss, expect)
    assert_close(grad, expect)
    assert_close(m["loss/token_weight_mean"], torch.tensor(0.5, dtype=F64))
    with pytest.raises(DataError, match="current_entropy"):
        run(fn, [[0.1]], [1.0])


def test_config_errors():
    for kw, key in [({"mixing": "x"}, "loss.mixing"), ({"weight": 1.5}, "loss.weight"),
                    ({"combine": "harmonic"}, "loss.combine"), ({"epsilon": -0.1}, "loss.epsilon"),
                    ({"seq_epsilon": 1.0}, "loss.seq_epsilon")]:
        with pytest.raises(ConfigError, match=key):
            from_config(DHPOLoss, **kw)


def loop_dhpo(logr, adv, mask, w, combine, et, eth, es, esh):
    """Values and gradients by hand: s depends on all tokens, but in GSPO-token form d s/d logp_t = s."""
    B, T = len(logr), len(logr[0])
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        n = sum(mask[i])
        s = math.exp(sum(logr[i][t] for t in range(T) if mask[i][t]) / max(n, 1))
        sc = min(max(s, 1 - es), 1 + esh)
        for t in range(T):
            if not mask[i][t]:
                continue
            r, a = math.exp(logr[i][t]), adv[i][t]
            rc = min(max(r, 1 - et), 1 + eth)
            dr, ds = (r if rc == r else 0.0), (s if sc == s else 0.0)  # d/dlogp of the (clipped) branch values
            if combine == "geometric":
                raw, clip = r ** w * s ** (1 - w), rc ** w * sc ** (1 - w)
                draw = raw  # d(r^w s^(1-w)) = rho (w + 1 - w)
                dclip = clip * (w * (dr / r) + (1 - w) * (ds / s))
            else:
                raw, clip = w * r + (1 - w) * s, w * rc + (1 - w) * sc
                draw, dclip = w * r + (1 - w) * s, w * dr + (1 - w) * ds
            if -a * clip > -a * raw:
                loss[i][t], grad[i][t] = -a * clip, -a * dclip
            else:
                loss[i][t], grad[i][t] = -a * raw, -a * draw
    return torch.tensor(loss, dtype=F64), torch.tensor(grad, dtype=F64)


@pytest.mark.parametrize("w, combine", [(0.5, "geometric"), (0.3, "arithmetic"), (0.8, "geometric")])
def test_matches_loop_reference(w, combine):
    et, eth, es, esh = 0.2, 0.28, 0.05, 0.08
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        logr = torch.randn(B, T, generator=g, dtype=F64) * 0.3
        adv = torch.randn(B, T, generator=g, dtype=F64)
        mask = torch.rand(B, T, generator=g) > 0.25
        mask[:, 0] = True
        fn = DHPOLoss(epsilon=et, epsilon_high=eth, seq_epsilon=es, seq_epsilon_high=esh, weight=w, combine=combine)
        loss, grad, _ = run(fn, logr, adv, mask)
        ref_loss, ref_grad = loop_dhpo(logr.tolist(), (adv * mask).tolist(), mask.tolist(), w, combine,
                                       et, eth, es, esh)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)


@pytest.mark.parametrize("seed", range(3))
def test_gradcheck_through_aggregator(seed):
    # The GSPO-token form gives the sequence branch the gradient s * dlogp_t per token, which is GSPO's gradient
    # only after the per-sequence token mean (not a finite difference of the per-token values). With one trained
    # token per row the two coincide (s = r), so float64 gradcheck of the whole hybrid is exact there.
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[:, 0] = True
    old = -torch.rand(4, 3, generator=g, dtype=F64)
    b = make_batch([0.0] * 4, None, mask, advantages=torch.randn(4, 3, generator=g, dtype=F64) * mask,
                   old_logprobs=old, dtype=F64)
    agg = SeqMeanTokenMean()
    norm = agg.normaliser(mask, 0)
    lp = (old + 0.03 * torch.randn(4, 3, generator=g, dtype=F64)).requires_grad_(True)
    fn = DHPOLoss(seq_epsilon=0.1, seq_epsilon_high=0.1, weight=0.4)
    assert torch.autograd.gradcheck(lambda x: agg(fn(x, b).per_token, mask, norm), (lp,))
