"""GSPO (arXiv:2507.18071), GSPO-token form (Eq. 13) with sequence ratio s_i = exp(mean_t log r_{i,t}) (Eq. 7).

Derivation of the gradient under seq_mean_token_mean (N sequences):
  l_{i,t} = -A_i * sg[s_i] * exp(lp_t - sg[lp_t])  (unclipped), value -A_i s_i for every valid t,
  d l_{i,t} / d lp_{i,t} = -A_i s_i, and l_{i,t} does not depend on lp_{i,t'} for t' != t.
  L = (1/N) sum_i (1/|y_i|) sum_t l_{i,t}  ->  dL/d lp_{i,t} = -A_i s_i / (N |y_i|)
  which equals the gradient of the sequence objective (Eq. 5) -(1/N) sum_i s_i A_i, since d s_i/d lp_{i,t} = s_i/|y_i|.
  Clipped sequences (A > 0, s > 1 + eps_high; A < 0, s < 1 - eps_low) get zero gradient on every token.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.gspo import GSPOLoss
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import make_batch

F64 = torch.float64
AGG = SeqMeanTokenMean()


def setup(logr, adv, mask, old=None):
    logr = torch.as_tensor(logr, dtype=F64)
    B, T = logr.shape
    mask = torch.as_tensor(mask, dtype=torch.bool)
    adv = torch.as_tensor(adv, dtype=F64)
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
    old = torch.full((B, T), -1.0, dtype=F64) if old is None else old
    b = make_batch([0.0] * B, None, mask, advantages=adv * mask, old_logprobs=old, dtype=F64)
    lp = (old + logr).detach().requires_grad_(True)
    return b, lp


def agg_loss_and_grad(loss_fn, b, lp):
    out = loss_fn(lp, b)
    total = AGG(out.per_token, b.response_mask, AGG.normaliser(b.response_mask, 0))
    (grad,) = torch.autograd.grad(total, lp)
    return out, total.detach(), grad


def test_hand():
    # eps_low 0.2, eps_high 0.28
    # row 0: mask [1, 1, 0], log r [0.2, -0.1, 5 (pad)], A = +1: s0 = exp((0.2 - 0.1)/2) = e^0.05 = 1.0513 < 1.28
    #        -> l = -e^0.05 on both valid tokens; dL/dlp = -e^0.05 / (2 * 2)
    # row 1: mask [1, 1, 1], log r [0.6, 0.3, 0.0], A = +2: s1 = e^0.3 = 1.3499 > 1.28 -> clipped
    #        -> l = -2 * 1.28 = -2.56 on each token, zero gradient
    # L = ((-2 e^0.05)/2 + (-2.56 * 3)/3) / 2 = (-e^0.05 - 2.56)/2
    b, lp = setup([[0.2, -0.1, 5.0], [0.6, 0.3, 0.0]], [1.0, 2.0], [[1, 1, 0], [1, 1, 1]])
    out, total, grad = agg_loss_and_grad(GSPOLoss(epsilon=0.2, epsilon_high=0.28), b, lp)
    s0 = math.exp(0.05)
    assert_close(out.per_token.detach(), torch.tensor([[-s0, -s0, 0.0], [-2.56, -2.56, -2.56]], dtype=F64))
    assert_close(total, torch.tensor((-s0 - 2.56) / 2, dtype=F64))
    assert_close(grad, torch.tensor([[-s0 / 4, -s0 / 4, 0.0], [0.0, 0.0, 0.0]], dtype=F64))
    # metrics (issue 21: clip_frac counts tokens, as verl's GSPO and the peers do): 3 of 5 trained tokens sit in
    # the clipped sequence -> 0.6 (a sequence count would say 0.5); mean sequence ratio (e^0.05 + e^0.3)/2
    assert_close(out.metrics["loss/clip_frac"], torch.tensor(0.6, dtype=out.metrics["loss/clip_frac"].dtype))
    assert_close(out.metrics["loss/ratio_mean"], torch.tensor((s0 + math.exp(0.3)) / 2, dtype=F64))


def test_hand_negative_advantage():
    # row 0: A = -1, log r [-0.5, -0.5]: s = e^-0.5 = 0.607 < 0.8 -> clipped: l = 0.8 per token, zero gradient
    # row 1: A = -1, log r [0.4, 0.4]:   s = e^0.4 = 1.492 (upper side unclipped for A < 0): l = s per token,
    #        dL/dlp = s / (2 * 2)
    b, lp = setup([[-0.5, -0.5], [0.4, 0.4]], [-1.0, -1.0], [[1, 1], [1, 1]])
    out, total, grad = agg_loss_and_grad(GSPOLoss(epsilon=0.2, epsilon_high=0.28), b, lp)
    s = math.exp(0.4)
    assert_close(out.per_token.detach(), torch.tensor([[0.8, 0.8], [s, s]], dtype=F64))
    assert_close(grad, torch.tensor([[0.0, 0.0], [s / 4, s / 4]], dtype=F64))


def random_inputs(seed, eps_low=0.2, eps_high=0.28):
    g = torch.Generator().manual_seed(seed)
    B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
    logr = torch.randn(B, T, generator=g, dtype=F64) * 0.6
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    s = torch.exp((logr * mask).sum(1) / mask.sum(1))
    near = ((s - 1 - eps_high).abs() < 1e-3) | ((s - 1 + eps_low).abs() < 1e-3)
    logr[near] = 0.0  # keep finite differences away from the kinks
    adv = torch.randn(B, generator=g, dtype=F64)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    return logr, adv, mask, old


@pytest.mark.parametrize("seed", range(6))
def test_property_sequence_ratio_constant_per_sequence(seed):
    logr, adv, mask, old = random_inputs(seed)
    b, lp = setup(logr, adv, mask, old)
    out = GSPOLoss(epsilon=0.2, epsilon_high=0.28)(lp, b)
    s = torch.exp((logr * mask).sum(1) / mask.sum(1))  # exp(mean log ratio)
    assert_close(out.metrics["loss/ratio_mean"], s.mean())
    pt = out.per_token.detach()
    for i in range(logr.shape[0]):
        valid = pt[i][mask[i]]
        assert_close(valid, valid[0].expand_as(valid))  # same value on every valid token
        assert torch.all(pt[i][~mask[i]] == 0)
        clipped = (adv[i] > 0 and s[i] > 1.28) or (adv[i] < 0 and s[i] < 0.8)
        if not clipped:
            assert_close(valid[0], -adv[i] * s[i])


def loop_gspo(logr, adv, mask, eps_low, eps_high):
    """Per-token loss and dL/dlp under seq_mean_token_mean, by explicit cases."""
    B, T = logr.shape
    N = sum(1 for i in range(B) if any(mask[i].tolist()))
    loss = torch.zeros(B, T, dtype=F64)
    grad = torch.zeros(B, T, dtype=F64)
    for i in range(B):
        valid = [t for t in range(T) if mask[i, t]]
        s = math.exp(sum(logr[i, t].item() for t in valid) / len(valid))
        a = adv[i].item()
        if a >= 0 and s > 1 + eps_high:
            val, g = -a * (1 + eps_high), 0.0
        elif a < 0 and s < 1 - eps_low:
            val, g = -a * (1 - eps_low), 0.0
        else:
            val, g = -a * s, -a * s / (N * len(valid))
        for t in valid:
            loss[i, t], grad[i, t] = val, g
    return loss, grad


@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.28), (0.1, 0.1)])
def test_matches_loop_reference(eps_low, eps_high):
    for seed in range(8):
        logr, adv, mask, old = random_inputs(seed, eps_low, eps_high)
        b, lp = setup(logr, adv, mask, old)
        out, _, grad = agg_loss_and_grad(GSPOLoss(epsilon=eps_low, epsilon_high=eps_high), b, lp)
        ref_loss, ref_grad = loop_gspo(logr, adv, mask, eps_low, eps_high)
        assert_close(out.per_token.detach(), ref_loss)
        assert_close(grad, ref_grad)


def sequence_objective(lp, old, adv, mask, eps_low, eps_high):
    """Eq. 5 written directly on sequences: -(1/N) sum_i min(s_i A_i, clip(s_i) A_i), s_i differentiable."""
    s = torch.exp(((lp - old) * mask).sum(1) / mask.sum(1))
    return -torch.minimum(s * adv, s.clamp(1 - eps_low, 1 + eps_high) * adv).mean()


@pytest.mark.parametrize("seed", range(4))
def test_gradient_equals_sequence_objective_gradient(seed):
    # GSPO-token's stop-gradient form defeats finite differences, so we gradcheck the plain sequence objective
    # (Eq. 5) and require GSPO-token's autograd gradient to equal it.
    logr, adv, mask, old = random_inputs(seed + 20)
    b, lp = setup(logr, adv, mask, old)
    _, total, grad = agg_loss_and_grad(GSPOLoss(epsilon=0.2, epsilon_high=0.28), b, lp)
    f = lambda x: sequence_objective(x, old, adv, mask, 0.2, 0.28)  # noqa: E731
    assert torch.autograd.gradcheck(f, (lp,))
    (ref_grad,) = torch.autograd.grad(f(lp), lp)
    assert_close(grad, ref_grad)
    assert_close(total, f(lp).detach())


@pytest.mark.parametrize("seed", range(4))
def test_on_policy_gradient_equals_ppo_gradient(seed):
    # logprobs == old: every ratio is 1, nothing is clipped; both give dL/dlp = -A_i / (N |y_i|)
    _, adv, mask, old = random_inputs(seed + 40)
    b, lp = setup(torch.zeros_like(old), adv, mask, old)
    out_g, tot_g, grad_g = agg_loss_and_grad(GSPOLoss(), b, lp)
    out_p, tot_p, grad_p = agg_loss_and_grad(PPOClipLoss(epsilon=0.2), b, lp)
    assert_close(out_g.per_token, out_p.per_token)
    assert_close(tot_g, tot_p)
    assert_close(grad_g, grad_p)
    exp = -b.advantages / (mask.sum(1, keepdim=True) * mask.shape[0])
    assert_close(grad_g, exp * mask)


def test_no_gradient_into_old_and_finite_at_extremes():
    old = torch.tensor([[-1.0, -2.0], [-50.0, 0.0]], dtype=F64, requires_grad=True)
    b = make_batch([0.0, 0.0], None, [[1, 1], [1, 1]], advantages=[[1.0, 1.0], [-1.0, -1.0]], old_logprobs=old,
                   dtype=F64)
    lp = torch.tensor([[-1.5, -0.5], [0.0, -50.0]], dtype=F64, requires_grad=True)
    out = GSPOLoss()(lp, b)
    out.per_token.sum().backward()
    assert old.grad is None
    assert torch.isfinite(out.per_token).all() and torch.isfinite(lp.grad).all()
    assert GSPOLoss.needs == frozenset({"old_logprobs"})
