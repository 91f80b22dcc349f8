"""CoPG (arXiv:2406.19185): l = (R(y) - R(y') - beta [h(y) - h(y')])^2, h = ln(pi/pi_ref) summed; mean over all pairs
of each group."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close

from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.copg import CoPGLoss
from factories import from_config, make_batch, random_groups, random_mask

F64 = torch.float64


def batch(rewards, groups, mask, ref):
    b = make_batch(rewards, groups, mask, advantages=torch.zeros(mask.shape), dtype=F64)
    return b.replace(ref_logprobs=ref)


def agg_loss(fn, lp, b):
    agg = SeqMeanTokenMean()
    return agg(fn(lp, b).per_token, b.response_mask, agg.normaliser(b.response_mask, 0))


def test_card_worked_case():
    # beta = 0.1, R = (1, 0), pi = pi_ref (h = 0): residual 1, L = 1; dL/dlogpi(y) = 2 * 1 * (-beta) = -0.2 spread
    # over y's tokens (each token's log-prob enters the sum), +0.2 for y'.
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    ref = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -0.7, 0.0]], dtype=F64)
    lp = ref.clone().requires_grad_(True)
    loss = agg_loss(from_config(CoPGLoss, beta=0.1), lp, batch([1.0, 0.0], [0, 0], mask, ref))
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert_close(lp.grad, torch.tensor([[-0.2, -0.2, -0.2], [0.2, 0.2, 0.0]], dtype=F64))


def test_fixed_point_has_zero_loss_and_gradient():
    # R(y) - R(y') = beta (h(y) - h(y')) for every pair when h = R / beta + c (any per-group constant c).
    mask = torch.ones(3, 2, dtype=torch.bool)
    ref = -torch.rand(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    R = torch.tensor([0.3, 1.0, -0.4], dtype=F64)
    beta = 0.25
    lp = (ref + torch.stack([R / beta + 0.7, torch.zeros(3, dtype=F64)], -1)).requires_grad_(True)
    loss = agg_loss(from_config(CoPGLoss, beta=beta), lp, batch(R, [0, 0, 0], mask, ref))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert_close(lp.grad, torch.zeros_like(lp), atol=1e-7, rtol=0)


def test_constant_margin_is_beta_squared_times_ipo():
    # one chosen/rejected pair with reward gap m: L = beta^2 (h_w - h_l - m/beta)^2 = beta^2 * IPO with 1/(2 tau) = m/beta
    beta, m, tau = 0.2, 0.5, 0.2  # m / beta = 2.5 = 1 / (2 tau)
    mask = torch.ones(2, 2, dtype=torch.bool)
    ref = torch.tensor([[-1.0, -1.0], [-2.0, -0.5]], dtype=F64)
    lp = torch.tensor([[-0.5, -1.2], [-2.5, -0.1]], dtype=F64)
    h = ((lp - ref) * mask).sum(-1)
    ipo = (h[0] - h[1] - 1 / (2 * tau)) ** 2
    loss = agg_loss(from_config(CoPGLoss, beta=beta), lp, batch([m, 0.0], [0, 0], mask, ref))
    assert loss.item() == pytest.approx(beta**2 * ipo.item())


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    groups = random_groups(g)
    B = groups.numel()
    mask = random_mask(g, B, 4)
    R = torch.randn(B, generator=g, dtype=F64)
    ref = -torch.rand(B, 4, generator=g, dtype=F64) * mask
    lp = (ref + 0.3 * torch.randn(B, 4, generator=g, dtype=F64)) * mask
    fn = from_config(CoPGLoss, beta=0.3)
    b = batch(R, groups, mask, ref)
    h = [float(((lp[i] - ref[i]) * mask[i]).sum()) for i in range(B)]
    terms = [(R[i] - R[j] - 0.3 * (h[i] - h[j])) ** 2 for i, j in itertools.combinations(range(B), 2)
             if groups[i] == groups[j]]
    expect = float(sum(terms) / len(terms)) if terms else 0.0
    assert agg_loss(fn, lp, b).item() == pytest.approx(expect, rel=1e-9, abs=1e-12)


def test_gradcheck():
    g = torch.Generator().manual_seed(8)
    mask = random_mask(g, 5, 3)
    ref = -torch.rand(5, 3, generator=g, dtype=F64) * mask
    b = batch(torch.randn(5, generator=g, dtype=F64), [0, 0, 0, 1, 1], mask, ref)
    x = (ref + 0.3 * torch.randn(5, 3, generator=g, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: agg_loss(from_config(CoPGLoss, beta=0.3), y * mask, b), (x,))


def test_bandit_converges_to_the_tilted_reference_from_off_policy_pairs():
    # Card: a softmax policy over 3 arms trained on *uniform* (not on-policy) pairs reaches pi_ref exp(R/beta) / Z.
    beta = 0.5
    R = torch.tensor([1.0, 0.0, 0.5], dtype=F64)
    ref_logits = torch.tensor([0.2, 1.0, -0.5], dtype=F64)
    ref = torch.log_softmax(ref_logits, 0)
    target = torch.softmax(ref + R / beta, 0)
    logits = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-15)
    fn = from_config(CoPGLoss, beta=beta)
    b = batch(R, [0, 0, 0], torch.ones(3, 1, dtype=torch.bool), ref[:, None])

    def closure():
        opt.zero_grad()
        loss = agg_loss(fn, torch.log_softmax(logits, 0)[:, None], b)
        loss.backward()
        return loss

    opt.step(closure)
    assert_close(torch.softmax(logits, 0).detach(), target, atol=1e-6, rtol=0)
