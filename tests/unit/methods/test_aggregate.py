"""Loss aggregators: token_mean, seq_mean_token_mean, seq_mean_token_sum_norm (Dr. GRPO), seq_mean_token_sum.

Analytic gradients (N = non-empty sequences, |y_i| = valid tokens of row i, H = horizon):
  token_mean:              dL/dl_{i,t} = m_{i,t} / sum|y|
  seq_mean_token_mean:     dL/dl_{i,t} = m_{i,t} / (N |y_i|)
  seq_mean_token_sum_norm: dL/dl_{i,t} = m_{i,t} / (N H)
  seq_mean_token_sum:      dL/dl_{i,t} = m_{i,t} / N
  token_sum:               dL/dl_{i,t} = m_{i,t}
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.methods.aggregate import SeqMeanTokenMean, SeqMeanTokenSum, SeqMeanTokenSumNorm, TokenMean
from lmpo.registry import AGGREGATORS

F64 = torch.float64
H = 10

# l = [[1, 2, 3, 4], [5, 6, 7, 8], [2, 4, 6, 8]], mask = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]] (a hole in row 2)
#   token sums 3, 26, 8 (total 37); counts 2, 4, 2 (total 8); N = 3
#   token_mean              = 37/8      = 4.625
#   seq_mean_token_mean     = (1.5 + 6.5 + 4)/3 = 4
#   seq_mean_token_sum_norm = 37/(3*10) = 37/30
#   seq_mean_token_sum      = 37/3
#   token_sum               = 37
L = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [2.0, 4.0, 6.0, 8.0]], dtype=F64)
M = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
HAND = {"token_mean": 37 / 8, "seq_mean_token_mean": 4.0, "seq_mean_token_sum_norm": 37 / 30,
        "seq_mean_token_sum": 37 / 3, "token_sum": 37.0}


def make(name):
    return SeqMeanTokenSumNorm(horizon=H) if name == "seq_mean_token_sum_norm" else AGGREGATORS.build(name)


def full(agg, l, m):
    return agg(l, m, agg.normaliser(m, H))


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand(name):
    agg = make(name)
    assert_close(full(agg, L, M), torch.tensor(HAND[name], dtype=F64))


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_empty_row_and_masked_garbage_change_nothing(name):
    # a 4th, fully masked row holding NaN/inf: not a sequence (N stays 3), contributes nothing
    l4 = torch.cat([L, torch.tensor([[float("nan"), float("inf"), -float("inf"), 1e30]], dtype=F64)])
    m4 = torch.cat([M, torch.zeros(1, 4, dtype=torch.bool)])
    l4[0, 3] = float("nan")  # masked position of a valid row
    agg = make(name)
    assert_close(full(agg, l4, m4), torch.tensor(HAND[name], dtype=F64))


def test_normalisers_hand():
    assert TokenMean().normaliser(M, H).item() == 8.0
    assert SeqMeanTokenMean().normaliser(M, H).item() == 3.0
    assert SeqMeanTokenSum().normaliser(M, H).item() == 3.0
    assert SeqMeanTokenSumNorm(horizon=H).normaliser(M, 999).item() == 30.0  # the parameter wins
    assert SeqMeanTokenSumNorm().normaliser(M, 7).item() == 21.0  # None -> the call-site horizon
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for name in HAND:  # an empty batch gives 0, not NaN
        assert full(make(name), torch.ones(2, 3, dtype=F64), empty).item() == 0.0


def test_sum_norm_uses_horizon_not_tensor_width():
    agg = SeqMeanTokenSumNorm(horizon=H)
    padded_l = torch.nn.functional.pad(L, (0, 5))
    padded_m = torch.nn.functional.pad(M, (0, 5))
    assert_close(full(agg, padded_l, padded_m), full(agg, L, M))
    assert_close(full(agg, L, M), torch.tensor(37 / (3 * H), dtype=F64))  # not 37/(3*4) (T = 4)


# --------------------------------------------------------------------------- loop reference
def loop_aggregate(name, l, m, horizon):
    B, T = l.shape
    rows = [[l[i, t].item() for t in range(T) if m[i, t]] for i in range(B)]
    rows = [r for r in rows if r]
    n = len(rows)
    if n == 0:
        return 0.0
    if name == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if name == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in rows) / n
    if name == "seq_mean_token_sum_norm":
        return sum(sum(r) for r in rows) / (n * horizon)
    if name == "token_sum":
        return sum(sum(r) for r in rows)
    return sum(sum(r) for r in rows) / n


def random_case(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
    l = torch.randn(B, T, generator=g, dtype=F64)
    m = torch.rand(B, T, generator=g) > 0.35  # some rows may be empty
    return l, m


@pytest.mark.parametrize("name", sorted(HAND))
def test_matches_loop_reference(name):
    for seed in range(8):
        l, m = random_case(seed)
        assert_close(full(make(name), l, m), torch.tensor(loop_aggregate(name, l, m, H), dtype=F64))


@pytest.mark.parametrize("name", sorted(HAND))
def test_micro_batch_invariance(name):
    # sum over micro-batches of agg(l_micro, m_micro, normaliser(full mask)) == agg(full batch), values and gradients
    for seed in range(8):
        l, m = random_case(seed)
        agg = make(name)
        norm = agg.normaliser(m, H)
        g = torch.Generator().manual_seed(seed + 100)
        cuts = sorted(set(torch.randint(0, l.shape[0] + 1, (3,), generator=g).tolist()) | {0, l.shape[0]})
        lf = l.clone().requires_grad_(True)
        total_full = agg(lf, m, norm)
        (g_full,) = torch.autograd.grad(total_full, lf)
        lm = l.clone().requires_grad_(True)
        total_micro = sum(agg(lm[a:b], m[a:b], norm) for a, b in zip(cuts[:-1], cuts[1:]))
        (g_micro,) = torch.autograd.grad(total_micro, lm)
        assert_close(total_micro, total_full)
        assert_close(g_micro, g_full)


@pytest.mark.parametrize("name", sorted(HAND))
def test_gradient_analytic_and_gradcheck(name):
    for seed in range(4):
        l, m = random_case(seed)
        agg = make(name)
        lg = l.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(full(agg, lg, m), lg)
        mf = m.to(F64)
        lengths = mf.sum(1, keepdim=True)
        n = max(int((lengths > 0).sum()), 1)
        exp = {
            "token_mean": mf / max(mf.sum().item(), 1.0),
            "seq_mean_token_mean": mf / (n * lengths.clamp_min(1)),
            "seq_mean_token_sum_norm": mf / (n * H),
            "seq_mean_token_sum": mf / n,
            "token_sum": mf,
        }[name]
        assert_close(grad, exp)
        assert torch.autograd.gradcheck(lambda x: full(agg, x, m), (lg,))
