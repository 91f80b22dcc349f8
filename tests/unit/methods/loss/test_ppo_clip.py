"""PPO clipped surrogate (arXiv:1707.06347 Eq. 7), DAPO clip-higher (arXiv:2503.14476 Eq. 10), dual clip
(arXiv:1912.09729 Eq. 5).

Per token, with r = exp(logp - old) and l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A):
  A >= 0: r > 1 + eps_high -> l = -A (1 + eps_high), dl/dlogp = 0;   otherwise l = -A r, dl/dlogp = -A r
  A <  0: r < 1 - eps_low  -> l = -A (1 - eps_low),  dl/dlogp = 0;   otherwise l = -A r, dl/dlogp = -A r
  dual clip c (A < 0 only): l = min(l, -c A); where the bound is active dl/dlogp = 0.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import from_config, make_batch

F64 = torch.float64


def run(loss_fn, ratios, adv, mask=None):
    """Per-token loss and d loss_t / d logp_t for given ratios (old = -1, logp = old + log r), in float64."""
    ratios = torch.as_tensor(ratios, dtype=F64)
    B, T = ratios.shape
    adv = torch.as_tensor(adv, dtype=F64)
    adv = adv[:, None].expand(B, T).clone() if adv.dim() == 1 else adv
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    old = torch.full((B, T), -1.0, dtype=F64, requires_grad=True)
    b = make_batch([0.0] * B, None, mask, advantages=adv * mask, old_logprobs=old, dtype=F64)
    lp = (old.detach() + ratios.log()).requires_grad_(True)
    out = loss_fn(lp, b)
    out.per_token.sum().backward()
    assert old.grad is None  # no gradient into the old log-probs
    return out.per_token.detach(), lp.grad, out.metrics


def test_hand_symmetric():
    # eps = 0.2.  Row 0, A = +1, r = [1.1, 1.5, 0.5, 1.0]:
    #   1.1 inside: l = -1.1, g = -1.1 | 1.5 > 1.2: l = -1.2, g = 0 | 0.5 < 0.8 but A > 0: min picks r A: l = -0.5,
    #   g = -0.5 | 1.0: l = -1, g = -1
    # Row 1, A = -2, r = [0.5, 1.5, 0.9, pad]:
    #   0.5 < 0.8: l = 2 * 0.8 = 1.6, g = 0 | 1.5 (A < 0, upper side not clipped): l = 3, g = 3 | 0.9: l = 1.8,
    #   g = 1.8 | pad: 0, 0
    # clip_frac = 2 clipped / 7 valid; ratio_mean = (1.1 + 1.5 + 0.5 + 1 + 0.5 + 1.5 + 0.9)/7 = 1
    loss, grad, metrics = run(PPOClipLoss(epsilon=0.2), [[1.1, 1.5, 0.5, 1.0], [0.5, 1.5, 0.9, 7.0]], [1.0, -2.0],
                              [[1, 1, 1, 1], [1, 1, 1, 0]])
    assert_close(loss, torch.tensor([[-1.1, -1.2, -0.5, -1.0], [1.6, 3.0, 1.8, 0.0]], dtype=F64))
    assert_close(grad, torch.tensor([[-1.1, 0.0, -0.5, -1.0], [0.0, 3.0, 1.8, 0.0]], dtype=F64))
    assert_close(metrics["loss/clip_frac"], torch.tensor(2.0 / 7.0))  # a float32 fraction
    assert_close(metrics["loss/ratio_mean"], torch.tensor(1.0, dtype=F64))
    assert all(not m.requires_grad for m in metrics.values())


def test_hand_epsilon_high():
    # eps_low 0.2, eps_high 0.28, r = [1.25, 1.3, 0.75, 0.85]
    # A = +1: 1.25 < 1.28 inside: -1.25, g -1.25 | 1.3 > 1.28: -1.28, g 0 | 0.75 (low side, A > 0): -0.75, g -0.75 |
    #         0.85: -0.85, g -0.85
    # A = -1: 1.25: 1.25, g 1.25 | 1.3 (upper, A < 0 unclipped): 1.3, g 1.3 | 0.75 < 0.8: 0.8, g 0 | 0.85: 0.85
    r = [[1.25, 1.3, 0.75, 0.85]] * 2
    loss, grad, _ = run(PPOClipLoss(epsilon=0.2, epsilon_high=0.28), r, [1.0, -1.0])
    assert_close(loss, torch.tensor([[-1.25, -1.28, -0.75, -0.85], [1.25, 1.3, 0.8, 0.85]], dtype=F64))
    assert_close(grad, torch.tensor([[-1.25, 0.0, -0.75, -0.85], [1.25, 1.3, 0.0, 0.85]], dtype=F64))
    # symmetric 0.2 clips the 1.25 token of the positive row: -1.2, g 0
    loss, grad, _ = run(PPOClipLoss(epsilon=0.2), r, [1.0, -1.0])
    assert loss[0, 0].item() == pytest.approx(-1.2, abs=1e-12) and grad[0, 0].item() == 0.0


def test_hand_dual_clip():
    # c = 3, eps 0.2, r = [4, 2, 0.5, 1]
    # A = -2: 4: max(8, 2.4) = 8 -> min(8, 6) = 6, g 0 | 2: max(4, 2.4) = 4 < 6, g 4 | 0.5: max(1, 1.6) = 1.6, g 0 |
    #         1: 2, g 2
    # A = +1 (dual clip does not apply): 4: -1.2, g 0 | 2: -1.2, g 0 | 0.5: -0.5, g -0.5 | 1: -1, g -1
    r = [[4.0, 2.0, 0.5, 1.0]] * 2
    loss, grad, _ = run(PPOClipLoss(epsilon=0.2, dual_clip=3.0), r, [-2.0, 1.0])
    assert_close(loss, torch.tensor([[6.0, 4.0, 1.6, 2.0], [-1.2, -1.2, -0.5, -1.0]], dtype=F64))
    assert_close(grad, torch.tensor([[0.0, 4.0, 0.0, 2.0], [0.0, 0.0, -0.5, -1.0]], dtype=F64))
    # without the dual clip the r = 4 token costs 8 and keeps gradient -A r = 8
    loss, grad, _ = run(PPOClipLoss(epsilon=0.2), r, [-2.0, 1.0])
    assert loss[0, 0].item() == pytest.approx(8.0) and grad[0, 0].item() == pytest.approx(8.0)


def test_config_errors():
    with pytest.raises(ConfigError, match="epsilon"):
        from_config(PPOClipLoss, epsilon=-0.1)
    with pytest.raises(ConfigError, match="epsilon"):
        from_config(PPOClipLoss, epsilon_high=-0.1)
    with pytest.raises(ConfigError, match="dual_clip"):
        from_config(PPOClipLoss, dual_clip=1.0)
    assert PPOClipLoss.needs == frozenset({"old_logprobs"})


# --------------------------------------------------------------------------- loop reference
def loop_ppo(logr, adv, mask, eps_low, eps_high, dual):
    B, T = len(logr), len(logr[0])
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            r, a = math.exp(logr[i][t]), adv[i][t]
            if a >= 0 and r > 1 + eps_high:
                l, g = -a * (1 + eps_high), 0.0
            elif a < 0 and r < 1 - eps_low:
                l, g = -a * (1 - eps_low), 0.0
            else:
                l, g = -a * r, -a * r
            if dual is not None and a < 0 and l > -dual * a:
                l, g = -dual * a, 0.0
            loss[i][t], grad[i][t] = l, g
    return torch.tensor(loss, dtype=F64), torch.tensor(grad, dtype=F64)


def random_inputs(seed, eps_low, eps_high):
    g = torch.Generator().manual_seed(seed)
    B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
    logr = torch.randn(B, T, generator=g, dtype=F64) * 0.5
    r = logr.exp()
    near = ((r - 1 - eps_high).abs() < 1e-3) | ((r - 1 + eps_low).abs() < 1e-3)
    logr = torch.where(near, torch.zeros_like(logr), logr)  # keep finite differences away from the kinks
    adv = torch.randn(B, T, generator=g, dtype=F64) * 2
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    return logr, adv * mask, mask


@pytest.mark.parametrize("eps_low, eps_high, dual", [(0.2, None, None), (0.2, 0.28, None), (0.1, 0.3, 3.0),
                                                      (0.2, 0.2, 1.5)])
def test_matches_loop_reference(eps_low, eps_high, dual):
    for seed in range(8):
        logr, adv, mask = random_inputs(seed, eps_low, eps_high or eps_low)
        ratios = logr.exp()
        loss, grad, _ = run(PPOClipLoss(epsilon=eps_low, epsilon_high=eps_high, dual_clip=dual), ratios, adv, mask)
        ref_loss, ref_grad = loop_ppo(logr.tolist(), adv.tolist(), mask.tolist(), eps_low, eps_high or eps_low, dual)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)
        if dual is not None:  # the dual-clip bound: negative-advantage loss never exceeds -c A
            neg = (adv < 0) & mask
            assert torch.all(loss[neg] <= -dual * adv[neg] + 1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_gradcheck_through_aggregator(seed):
    logr, adv, mask = random_inputs(seed + 10, 0.2, 0.28)
    old = -torch.rand(logr.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    b = make_batch([0.0] * logr.shape[0], None, mask, advantages=adv, old_logprobs=old, dtype=F64)
    loss_fn, agg = PPOClipLoss(epsilon=0.2, epsilon_high=0.28, dual_clip=3.0), SeqMeanTokenMean()
    norm = agg.normaliser(mask, 0)
    lp = (old + logr).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: agg(loss_fn(x, b).per_token, mask, norm), (lp,))


def test_masked_tokens_zero_loss_zero_grad_even_with_extreme_values():
    mask = [[1, 0, 1]]
    old = torch.tensor([[-1.0, 0.0, -1.0]], dtype=F64)
    b = make_batch([0.0], None, mask, advantages=[[1.0, 0.0, -1.0]], old_logprobs=old, dtype=F64)
    lp = torch.tensor([[-1.2, -1e4, 50.0]], dtype=F64, requires_grad=True)
    out = PPOClipLoss()(lp, b)
    out.per_token.sum().backward()
    assert out.per_token[0, 1].item() == 0.0 and lp.grad[0, 1].item() == 0.0
    assert torch.isfinite(out.per_token).all() and torch.isfinite(lp.grad).all()
