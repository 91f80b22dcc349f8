"""INPO (arXiv:2407.00617): (h_t - 1/(2 eta))^2, h_t = policy margin - (tau/eta) ref margin - (1 - tau/eta) pi_t
margin, on the (best, worst) pair of each group."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.inpo import INPOLoss
from factories import from_config, make_batch, random_groups, random_mask

F64 = torch.float64


def agg_loss(fn, lp, b):
    agg = SeqMeanTokenMean()
    return agg(fn(lp, b).per_token, b.response_mask, agg.normaliser(b.response_mask, 0))


def pair(policy_margin, ref_margin, prev_margin):
    # two one-token responses of one prompt; the first has the higher reward (chosen)
    mask = torch.ones(2, 1, dtype=torch.bool)
    col = lambda m: torch.tensor([[m - 1.0], [-1.0]], dtype=F64)  # noqa: E731  margin m between the rows
    b = make_batch([1.0, 0.0], [0, 0], mask, advantages=torch.zeros(2, 1), old_logprobs=col(prev_margin), dtype=F64)
    return col(policy_margin).requires_grad_(True), b.replace(ref_logprobs=col(ref_margin))


def test_card_worked_example():
    # eta = 1, tau = 0.5, margins: policy 1.0, ref 0.4, pi_t 0.6 -> h = 1.0 - 0.5*0.4 - 0.5*0.6 = 0.5, target 0.5,
    # loss 0 (and zero gradient); policy margin 2.0 -> h = 1.5, loss 1.0, d loss/d log pi(y_w) = 2 (h - 0.5) = 2.
    fn = from_config(INPOLoss, eta=1.0, tau=0.5)
    lp, b = pair(1.0, 0.4, 0.6)
    loss = agg_loss(fn, lp, b)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and torch.all(lp.grad.abs() < 1e-12)
    lp, b = pair(2.0, 0.4, 0.6)
    loss = agg_loss(fn, lp, b)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert_close(lp.grad, torch.tensor([[2.0], [-2.0]], dtype=F64))


@pytest.mark.parametrize("seed", range(4))
def test_card_tau_equal_eta_is_ipo_against_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    groups = random_groups(g)
    B = groups.numel()
    mask = random_mask(g, B, 3)
    lp, ref, old = (-torch.rand(B, 3, generator=g, dtype=F64) * mask for _ in range(3))
    r = torch.randn(B, generator=g, dtype=F64)
    b = make_batch(r, groups, mask, advantages=torch.zeros(B, 3), old_logprobs=old, dtype=F64).replace(ref_logprobs=ref)
    eta = 0.4
    seq_h = ((lp - ref) * mask).sum(-1)
    terms = []
    for gid in set(groups.tolist()):  # IPO on the (best, worst) pair of each group, unique rewards almost surely
        rows = [i for i in range(B) if groups[i] == gid]
        if len(rows) > 1:
            w, l = max(rows, key=lambda i: r[i]), min(rows, key=lambda i: r[i])
            terms.append((seq_h[w] - seq_h[l] - 1 / (2 * eta)) ** 2)
    expect = float(sum(terms) / len(terms)) if terms else 0.0
    assert agg_loss(from_config(INPOLoss, eta=eta, tau=eta), lp, b).item() == pytest.approx(expect, rel=1e-9, abs=1e-12)


def test_gradcheck_and_no_gradient_into_pi_t():
    g = torch.Generator().manual_seed(9)
    mask = random_mask(g, 6, 3)
    ref = -torch.rand(6, 3, generator=g, dtype=F64) * mask
    old = (-torch.rand(6, 3, generator=g, dtype=F64) * mask).requires_grad_(True)
    b = make_batch([2.0, 0.0, 1.0, 1.0, 0.5, 0.0], [0, 0, 0, 1, 1, 1], mask, advantages=torch.zeros(6, 3),
                   dtype=F64).replace(ref_logprobs=ref, old_logprobs=old)
    fn = from_config(INPOLoss, eta=0.5, tau=0.1, pairs="all")
    x = (-torch.rand(6, 3, generator=g, dtype=F64) * mask).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: agg_loss(fn, y * mask, b), (x,))
    agg_loss(fn, x, b).backward()
    assert old.grad is None


def test_tau_above_eta_is_a_config_error():
    with pytest.raises(ConfigError, match="loss.tau must be <= loss.eta"):
        from_config(INPOLoss, eta=0.1, tau=0.2)
