"""P3O (arXiv:2310.00212): pairwise clipped whole-response ratios driven by the pair's reward difference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.p3o import P3OLoss
from factories import from_config, make_batch, random_groups, random_mask

F64 = torch.float64


def batch(rewards, groups, mask, old):
    return make_batch(rewards, groups, mask, advantages=torch.zeros(mask.shape), old_logprobs=old, dtype=F64)


def agg_loss(fn, lp, b):
    agg = SeqMeanTokenMean()
    return agg(fn(lp, b).per_token, b.response_mask, agg.normaliser(b.response_mask, 0))


def two_rows(log_rho1, log_rho2, rewards=(2.0, 0.0)):
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    old = torch.tensor([[-1.0, -0.5], [-0.7, 0.0]], dtype=F64)
    lp = (old + torch.tensor([[log_rho1, 0.0], [log_rho2, 0.0]], dtype=F64)).requires_grad_(True)
    return lp, batch(list(rewards), [0, 0], mask, old)


@pytest.mark.parametrize("variant", ["separate", "joint"])
def test_card_on_policy_gradient_is_the_pairwise_policy_gradient(variant):
    # rho_1 = rho_2 = 1, Delta = 2: separate L = -1/2 [rho_1 * 2 + rho_2 * (-2)] = 0, dL/dlog pi(y1) = -1, y2: +1;
    # joint L = -1/2 rho_12 * 2 = -1 with the same gradient (d rho_12 / d log pi(y2) = -rho_12). Every token of a
    # response gets its sequence's derivative (log pi(y) is the sum of its tokens).
    lp, b = two_rows(0.0, 0.0)
    loss = agg_loss(from_config(P3OLoss, variant=variant), lp, b)
    assert loss.item() == pytest.approx(0.0 if variant == "separate" else -1.0)
    loss.backward()
    assert_close(lp.grad, torch.tensor([[-1.0, -1.0], [1.0, 0.0]], dtype=F64))


def test_card_joint_clip_case():
    # Delta = 2 > 0, rho_12 = 1.5, eps = 0.2: min(1.5 * 2, 1.2 * 2) = 2.4 -> L = -1.2, no gradient.
    lp, b = two_rows(math.log(3.0), math.log(2.0))
    loss = agg_loss(from_config(P3OLoss, variant="joint", epsilon=0.2), lp, b)
    assert loss.item() == pytest.approx(-1.2)
    loss.backward()
    assert torch.all(lp.grad == 0)


def test_separate_clip_hand_case():
    # Delta = 1: rho_1 = 1.5 -> -min(1.5, 1.2) = -1.2 (clipped); rho_2 = 0.5 with -Delta: -min(-0.5, -0.8) = 0.8
    # (clipped) -> L = (-1.2 + 0.8) / 2 = -0.2 and no gradient.
    lp, b = two_rows(math.log(1.5), math.log(0.5), rewards=(1.0, 0.0))
    out = from_config(P3OLoss)(lp, b)
    loss = agg_loss(from_config(P3OLoss), lp, b)
    assert loss.item() == pytest.approx(-0.2) and out.metrics["loss/clip_frac"].item() == 1.0
    loss.backward()
    assert torch.all(lp.grad == 0)


def test_card_reward_offset_invariance():
    g = torch.Generator().manual_seed(1)
    mask = random_mask(g, 6, 3)
    old = -torch.rand(6, 3, generator=g, dtype=F64) * mask
    lp = old + 0.2 * torch.randn(6, 3, generator=g, dtype=F64)
    r = torch.randn(6, generator=g, dtype=F64)
    groups = [0, 0, 0, 1, 1, 1]
    fn = from_config(P3OLoss)
    shifted = r + torch.tensor([3.0] * 3 + [-5.0] * 3, dtype=F64)
    assert_close(fn(lp, batch(shifted, groups, mask, old)).per_token, fn(lp, batch(r, groups, mask, old)).per_token)


def slow(lp, old, mask, r, groups, eps, variant):
    lr = [float(((lp[i] - old[i]) * mask[i]).sum()) for i in range(len(r))]
    clip = lambda x: min(max(x, 1 - eps), 1 + eps)  # noqa: E731
    terms = []
    for i, j in itertools.combinations(range(len(r)), 2):
        if groups[i] != groups[j]:
            continue
        d = float(r[i] - r[j])
        if variant == "separate":
            a, b = math.exp(lr[i]), math.exp(lr[j])
            terms.append(-0.5 * (min(a * d, clip(a) * d) + min(-b * d, -clip(b) * d)))
        else:
            q = math.exp(lr[i] - lr[j])
            terms.append(-0.5 * min(q * d, clip(q) * d))
    return sum(terms) / len(terms) if terms else 0.0


@pytest.mark.parametrize("variant", ["separate", "joint"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_a_loop_reference(variant, seed):
    g = torch.Generator().manual_seed(seed)
    groups = random_groups(g)
    B = groups.numel()
    mask = random_mask(g, B, 3)
    old = -torch.rand(B, 3, generator=g, dtype=F64) * mask
    lp = (old + 0.15 * torch.randn(B, 3, generator=g, dtype=F64)) * mask
    r = torch.randn(B, generator=g, dtype=F64)
    b = batch(r, groups, mask, old)
    fn = from_config(P3OLoss, variant=variant, epsilon=0.2)
    expect = slow(lp, old, mask, r.tolist(), groups.tolist(), 0.2, variant)
    assert agg_loss(fn, lp, b).item() == pytest.approx(expect, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("variant", ["separate", "joint"])
def test_gradcheck(variant):
    g = torch.Generator().manual_seed(8)
    mask = random_mask(g, 5, 3)
    old = -torch.rand(5, 3, generator=g, dtype=F64) * mask
    b = batch(torch.randn(5, generator=g, dtype=F64), [0, 0, 0, 1, 1], mask, old)
    x = ((old + 0.15 * torch.randn(5, 3, generator=g, dtype=F64)) * mask).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: agg_loss(from_config(P3OLoss, variant=variant), y * mask, b), (x,))
