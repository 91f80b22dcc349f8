"""BAPO adaptive clipping (arXiv:2510.18927).

Search: from (0.6, 1.2), while rho < 0.5 raise c_low by 0.05 up to 0.9, then c_high by 0.05 up to 3.0.
Gradient-bearing share: rho = P / (P + N), P = sum_{A>0, r<=c_high} r A, N = sum_{A<0, r>=c_low} r |A|.
Loss: PPO clip with absolute bounds [c_low, c_high] and dual clip 3 for A < 0.
"""

from __future__ import annotations


import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.loss.bapo import BAPOLoss
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import from_config, make_batch, run_token_loss

F64 = torch.float64


def run(loss_fn, ratios, adv, mask=None):
    return run_token_loss(loss_fn, torch.as_tensor(ratios, dtype=F64).log(), adv, mask)


def test_card_worked_example_gradient_bearing_share():
    # Tokens (r, A) = (0.80, -1), (0.67, -1), (1.10, +1).  At (0.6, 1.2): rho = 1.10 / (1.10 + 0.80 + 0.67) = 0.428.
    # c_low = 0.65: all three still bear gradient -> 0.428; c_low = 0.70: r = 0.67 < 0.70 drops out ->
    # rho = 1.10 / 1.90 = 0.579 >= 0.5 -> final bounds (0.70, 1.2).
    # Loss at (0.70, 1.2): (0.80, -1): inside -> 0.80, g 0.80 | (0.67, -1): below 0.70 -> 0.70, g 0 |
    # (1.10, +1): -1.10, g -1.10.
    loss, grad, m = run(BAPOLoss(), [[0.80, 0.67, 1.10]], [[-1.0, -1.0, 1.0]])
    assert m["loss/clip_low"].item() == pytest.approx(0.70) and m["loss/clip_high"].item() == pytest.approx(1.2)
    assert m["loss/positive_share"].item() == pytest.approx(1.10 / 1.90)
    assert_close(loss, torch.tensor([[0.80, 0.70, -1.10]], dtype=F64))
    assert_close(grad, torch.tensor([[0.80, 0.0, -1.10]], dtype=F64))


def test_card_regression_released_code_variant_never_reaches_target():
    # Clamped contributions: N = max(0.80, c_low) + max(0.67, c_low) only grows with c_low and c_high changes nothing
    # (1.10 < 1.2), so rho never reaches 0.5 and the search ends at (0.9, 3.0): rho = 1.10 / (1.10 + 0.9 + 0.9).
    _, _, m = run(BAPOLoss(contribution="clamped"), [[0.80, 0.67, 1.10]], [[-1.0, -1.0, 1.0]])
    assert m["loss/clip_low"].item() == pytest.approx(0.9) and m["loss/clip_high"].item() == pytest.approx(3.0)
    assert m["loss/positive_share"].item() == pytest.approx(1.10 / 2.90)


def test_card_balanced_batch_keeps_start_bounds_and_equals_ppo_with_those_bounds():
    # rho >= 0.5 at the start: bounds stay (0.6, 1.2); the loss is PPO with eps_low 0.4, eps_high 0.2, dual clip 3.
    g = torch.Generator().manual_seed(0)
    ratios = (torch.randn(4, 5, generator=g, dtype=F64) * 0.4).exp()
    adv = torch.randn(4, 5, generator=g, dtype=F64).abs()
    adv[0] = -adv[0]  # mostly positive -> share well above 0.5
    loss, grad, m = run(BAPOLoss(), ratios, adv)
    assert m["loss/clip_low"].item() == pytest.approx(0.6) and m["loss/clip_high"].item() == pytest.approx(1.2)
    ref_loss, ref_grad, _ = run(PPOClipLoss(epsilon=0.4, epsilon_high=0.2, dual_clip=3.0), ratios, adv)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


def test_search_path_and_config_errors():
    path = BAPOLoss().candidates()
    assert len(path) == 7 + 36 and path[6] == pytest.approx((0.9, 1.2)) and path[-1] == pytest.approx((0.9, 3.0))
    for kw, key in [({"target": 1.0}, "loss.target"), ({"low_start": 0.95}, "loss.low_start"),
                    ({"high_start": 0.9}, "loss.high_start"), ({"low_step": 0.0}, "loss.low_step"),
                    ({"dual_clip": 1.0}, "loss.dual_clip"), ({"contribution": "x"}, "loss.contribution")]:
        with pytest.raises(ConfigError, match=key):
            from_config(BAPOLoss, **kw)


def loop_bapo(ratios, adv, mask, target=0.5, dual=3.0):
    """The paper's while-loop, literally, then a per-token PPO loss with the final bounds."""
    B, T = len(ratios), len(ratios[0])
    toks = [(ratios[i][t], adv[i][t]) for i in range(B) for t in range(T) if mask[i][t]]

    def share(lo, hi):
        p = sum(r * a for r, a in toks if a > 0 and r <= hi)
        n = sum(-r * a for r, a in toks if a < 0 and r >= lo)
        return 1.0 if p + n == 0 else p / (p + n)

    i_lo, i_hi = 0, 0
    while share(0.6 + 0.05 * i_lo, 1.2 + 0.05 * i_hi) < target:
        if i_lo < 6:
            i_lo += 1
        elif i_hi < 36:
            i_hi += 1
        else:
            break
    lo, hi = 0.6 + 0.05 * i_lo, 1.2 + 0.05 * i_hi
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            r, a = ratios[i][t], adv[i][t]
            if (a >= 0 and r > hi) or (a < 0 and r < lo):
                l, g = -a * min(max(r, lo), hi), 0.0
            else:
                l, g = -a * r, -a * r
            if a < 0 and l > -dual * a:
                l, g = -dual * a, 0.0
            loss[i][t], grad[i][t] = l, g
    return (lo, hi), torch.tensor(loss, dtype=F64), torch.tensor(grad, dtype=F64)


def test_matches_loop_reference():
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        ratios = (torch.randn(B, T, generator=g, dtype=F64) * 0.6).exp()
        adv = torch.randn(B, T, generator=g, dtype=F64) - 0.5 * (seed % 3)  # some batches dominated by negatives
        mask = torch.rand(B, T, generator=g) > 0.25
        loss, grad, m = run(BAPOLoss(), ratios, adv, mask)
        (lo, hi), ref_loss, ref_grad = loop_bapo(ratios.tolist(), (adv * mask).tolist(), mask.tolist())
        assert m["loss/clip_low"].item() == pytest.approx(lo) and m["loss/clip_high"].item() == pytest.approx(hi)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)


def test_gradcheck_through_aggregator():
    # The bounds are piecewise constant in the log-probs; away from the ratios where the chosen bounds change
    # (small perturbations of well-separated ratios) the aggregated loss is smooth and gradcheck applies.
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(3, 4, generator=g) > 0.2
    mask[:, 0] = True
    old = -torch.rand(3, 4, generator=g, dtype=F64)
    adv = torch.randn(3, 4, generator=g, dtype=F64) * mask
    b = make_batch([0.0] * 3, None, mask, advantages=adv, old_logprobs=old, dtype=F64)
    agg = TokenMean()
    norm = agg.normaliser(mask, 0)
    lp = (old + torch.tensor([[0.02, -0.5, 0.3, 1.2]] * 3, dtype=F64) * torch.tensor([[1.0], [-1.0], [0.5]],
                                                                                       dtype=F64))
    lp = lp.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: agg(BAPOLoss()(x, b).per_token, mask, norm), (lp,))
