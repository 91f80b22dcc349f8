"""REINFORCE score-function loss (arXiv:2402.14740 Eq. 6): l_t = -A_t log pi(o_t), dl_t/dlogp_t = -A_t."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.methods.aggregate import SeqMeanTokenSum
from lmpo.methods.loss.reinforce import ReinforceLoss
from factories import make_batch

F64 = torch.float64


def test_hand():
    # A = [[2, -1, 0.5], [3, 3, 3 (pad)]], logp = [[-1, -2, -0.5], [-0.1, -0.2, -9 (pad)]]
    #   l = -A logp = [[2, -2, 0.25], [0.3, 0.6, 0]];  dl/dlogp = -A = [[-2, 1, -0.5], [-3, -3, 0]]
    # seq_mean_token_sum over N = 2: L = (2 - 2 + 0.25 + 0.3 + 0.6)/2 = 0.575, dL/dlogp = -A/2 on valid tokens
    mask = [[1, 1, 1], [1, 1, 0]]
    b = make_batch([0.0, 0.0], None, mask, advantages=[[2.0, -1.0, 0.5], [3.0, 3.0, 3.0]], dtype=F64)
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -9.0]], dtype=F64, requires_grad=True)
    out = ReinforceLoss()(lp, b)
    assert_close(out.per_token.detach(), torch.tensor([[2.0, -2.0, 0.25], [0.3, 0.6, 0.0]], dtype=F64))
    assert out.metrics == {}
    (g,) = torch.autograd.grad(out.per_token.sum(), lp, retain_graph=True)
    assert_close(g, torch.tensor([[-2.0, 1.0, -0.5], [-3.0, -3.0, 0.0]], dtype=F64))
    agg = SeqMeanTokenSum()
    m = b.response_mask
    total = agg(out.per_token, m, agg.normaliser(m, 0))
    assert_close(total.detach(), torch.tensor(0.575, dtype=F64))
    (g,) = torch.autograd.grad(total, lp)
    assert_close(g, torch.tensor([[-1.0, 0.5, -0.25], [-1.5, -1.5, 0.0]], dtype=F64))


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference_and_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
    adv = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.3
    lp = (-torch.rand(B, T, generator=g, dtype=F64) * 5).requires_grad_(True)
    b = make_batch([0.0] * B, None, mask, advantages=adv, dtype=F64)
    out = ReinforceLoss()(lp, b)
    ref = torch.tensor([[-adv[i, t].item() * lp[i, t].item() if mask[i, t] else 0.0 for t in range(T)]
                        for i in range(B)], dtype=F64)
    assert_close(out.per_token.detach(), ref)
    (grad,) = torch.autograd.grad(out.per_token.sum(), lp)
    assert_close(grad, -adv * mask)
    assert torch.autograd.gradcheck(lambda x: ReinforceLoss()(x, b).per_token, (lp,))


def test_needs_nothing_and_masked_extremes_are_zero():
    assert ReinforceLoss.needs == frozenset()
    b = make_batch([0.0], None, [[1, 0]], advantages=[[1.0, 5.0]], dtype=F64)
    lp = torch.tensor([[-1.0, -1e30]], dtype=F64, requires_grad=True)
    out = ReinforceLoss()(lp, b)
    out.per_token.sum().backward()
    assert out.per_token[0, 1].item() == 0.0 and lp.grad[0, 1].item() == 0.0
