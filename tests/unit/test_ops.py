"""lmpo.ops: masked reductions, group statistics, KL estimators and ratios.

Hand values are derived in the comments; random cases are checked against plain-Python loops written here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo import ops

NAN, INF = float("nan"), float("inf")
F64 = torch.float64


# =========================================================================== masked reductions
# x = [[1, 2, 3], [4, 5, 6]], mask = [[1, 1, 0], [0, 1, 1]] -> selected values {1, 2, 5, 6}
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
M = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)


# --------------------------------------------------------------------------- zero_outside
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool])
def test_zero_outside_equals_where_with_a_scalar_zero_and_keeps_dtype(dtype):
    x = torch.tensor([[3, -2, 5], [7, 1, -4]]).to(dtype)
    m = torch.tensor([[True, False, True], [False, True, True]])
    out = ops.zero_outside(x, m)
    assert out.dtype == dtype and out.device == x.device
    assert torch.equal(out, torch.where(m, x, torch.zeros((), dtype=dtype)))
    assert out.tolist() == torch.tensor([[3, 0, 5], [0, 1, -4]]).to(dtype).tolist()


def test_zero_outside_broadcasts_like_where_and_accepts_a_0_1_mask():
    x = torch.tensor([[1.5], [-2.0]])  # (B, 1): a per-row value spread over the trained tokens
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    assert ops.zero_outside(x, m).tolist() == [[1.5, 1.5, 0.0], [-2.0, 0.0, 0.0]]
    assert ops.zero_outside(torch.arange(3.0), torch.tensor(True)).tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_zero_outside_gradient_flows_only_through_kept_entries(bad):
    # x * mask would give 0 * inf = NaN forward and a NaN gradient through anything that divides by x; where does not
    x = torch.tensor([2.0, bad, -1.0], requires_grad=True)
    m = torch.tensor([True, False, True])
    y = ops.zero_outside(x, m)
    assert y.tolist() == [2.0, 0.0, -1.0]
    (y * y).sum().backward()
    assert x.grad.tolist() == [4.0, 0.0, -2.0]
    # broadcast x: its gradient sums over the kept positions of its row only
    v = torch.tensor([[3.0], [bad]], requires_grad=True)
    ops.zero_outside(v, torch.tensor([[True, True, False], [False, False, False]])).sum().backward()
    assert v.grad.tolist() == [[2.0], [0.0]]


def test_masked_sum_hand():
    # total 1+2+5+6 = 14; per row [1+2, 5+6] = [3, 11]; per column [1, 2+5, 6] = [1, 7, 6]
    assert_close(ops.masked_sum(X, M), torch.tensor(14.0, dtype=F64))
    assert_close(ops.masked_sum(X, M, dim=-1), torch.tensor([3.0, 11.0], dtype=F64))
    assert_close(ops.masked_sum(X, M, dim=0), torch.tensor([1.0, 7.0, 6.0], dtype=F64))


def test_masked_mean_hand():
    # total 14 / 4 tokens = 3.5; rows 3/2 = 1.5 and 11/2 = 5.5
    assert_close(ops.masked_mean(X, M), torch.tensor(3.5, dtype=F64))
    assert_close(ops.masked_mean(X, M, dim=-1), torch.tensor([1.5, 5.5], dtype=F64))
    # a float 0/1 mask means the same thing
    assert_close(ops.masked_mean(X, M.to(F64)), torch.tensor(3.5, dtype=F64))


def test_masked_var_hand():
    # mean 3.5, deviations -2.5, -1.5, 1.5, 2.5 -> squares 6.25 + 2.25 + 2.25 + 6.25 = 17
    # unbiased 17/3, biased 17/4
    assert_close(ops.masked_var(X, M), torch.tensor(17.0 / 3.0, dtype=F64))
    assert_close(ops.masked_var(X, M, unbiased=False), torch.tensor(17.0 / 4.0, dtype=F64))


def test_masked_whiten_hand():
    # (x - 3.5) / sqrt(17/3) on the mask, 0 elsewhere; shift_mean=False: x / sqrt(17/3)
    s = math.sqrt(17.0 / 3.0)
    exp = torch.tensor([[-2.5 / s, -1.5 / s, 0.0], [0.0, 1.5 / s, 2.5 / s]], dtype=F64)
    assert_close(ops.masked_whiten(X, M), exp)
    exp_noshift = torch.tensor([[1.0 / s, 2.0 / s, 0.0], [0.0, 5.0 / s, 6.0 / s]], dtype=F64)
    assert_close(ops.masked_whiten(X, M, shift_mean=False), exp_noshift)


def test_single_element_var_is_zero():
    # n = 1: the Bessel denominator (n - 1) is clamped to 1, ss = 0 -> 0 (not NaN)
    m = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert ops.masked_var(X, m).item() == 0.0


def test_empty_mask_gives_zero_not_nan():
    empty = torch.zeros_like(M)
    assert ops.masked_sum(X, empty).item() == 0.0
    assert ops.masked_mean(X, empty).item() == 0.0
    assert ops.masked_var(X, empty).item() == 0.0
    assert ops.masked_var(X, empty, unbiased=False).item() == 0.0
    assert torch.equal(ops.masked_whiten(X, empty), torch.zeros_like(X))
    # a row with no valid token has mean 0
    m = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert_close(ops.masked_mean(X, m, dim=-1), torch.tensor([1.5, 0.0], dtype=F64))


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_masked_nan_inf_does_not_leak_forward(bad):
    dirty = X.clone()
    dirty[~M] = bad
    assert_close(ops.masked_sum(dirty, M), ops.masked_sum(X, M))
    assert_close(ops.masked_sum(dirty, M, dim=-1), ops.masked_sum(X, M, dim=-1))
    assert_close(ops.masked_mean(dirty, M), ops.masked_mean(X, M))
    assert_close(ops.masked_mean(dirty, M, dim=-1), ops.masked_mean(X, M, dim=-1))
    assert_close(ops.masked_var(dirty, M), ops.masked_var(X, M))
    assert_close(ops.masked_whiten(dirty, M), ops.masked_whiten(X, M))


@pytest.mark.parametrize("bad", [NAN, INF])
def test_masked_nan_inf_does_not_leak_into_gradient_of_sum_and_mean(bad):
    dirty = X.clone()
    dirty[~M] = bad
    x = dirty.requires_grad_(True)
    ops.masked_sum(x, M).backward()
    assert torch.equal(x.grad, M.to(F64))
    x.grad = None
    ops.masked_mean(x, M).backward()
    assert_close(x.grad, M.to(F64) / 4.0)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_masked_nan_does_not_leak_into_gradient_of_var_and_whiten(bad):
    # regression: (x - mean)**2 used to be formed before masking, so 0 * NaN = NaN reached every gradient entry
    dirty = X.clone()
    dirty[~M] = bad
    x = dirty.requires_grad_(True)
    ops.masked_var(x, M).backward()
    # d var / d x_j = 2 (x_j - mean) / (n - 1) on the mask: 2 * [-2.5, -1.5, 1.5, 2.5] / 3, 0 elsewhere
    exp = torch.tensor([[-5.0 / 3, -1.0, 0.0], [0.0, 1.0, 5.0 / 3]], dtype=F64)
    assert_close(x.grad, exp)
    x.grad = None
    ops.masked_whiten(x, M).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[~M] == 0)


def _loop_masked_stats(x, m):
    vals = [float(v) for v, k in zip(x.flatten().tolist(), m.flatten().tolist()) if k]
    n = len(vals)
    mean = sum(vals) / n if n else 0.0
    ss = sum((v - mean) ** 2 for v in vals)
    return sum(vals), mean, ss / max(n - 1, 1), ss / max(n, 1)


@pytest.mark.parametrize("seed", range(5))
def test_masked_reductions_match_loops(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
    x = torch.randn(B, T, generator=g, dtype=F64)
    m = torch.rand(B, T, generator=g) > 0.4
    s, mean, var_u, var_b = _loop_masked_stats(x, m)
    assert_close(ops.masked_sum(x, m), torch.tensor(s, dtype=F64))
    assert_close(ops.masked_mean(x, m), torch.tensor(mean, dtype=F64))
    assert_close(ops.masked_var(x, m), torch.tensor(var_u, dtype=F64))
    assert_close(ops.masked_var(x, m, unbiased=False), torch.tensor(var_b, dtype=F64))
    row_means = [_loop_masked_stats(x[i], m[i])[1] for i in range(B)]
    assert_close(ops.masked_mean(x, m, dim=-1), torch.tensor(row_means, dtype=F64))
    std = math.sqrt(var_u)
    exp = [[(x[i, t].item() - mean) / (std + 1e-8) if m[i, t] else 0.0 for t in range(T)] for i in range(B)]
    assert_close(ops.masked_whiten(x, m), torch.tensor(exp, dtype=F64))


def test_masked_whiten_property_mean_zero_std_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=F64) * 3 + 2
    m = torch.rand(6, 5, generator=g) > 0.3
    w = ops.masked_whiten(x, m)
    assert_close(ops.masked_mean(w, m), torch.tensor(0.0, dtype=F64), atol=1e-12, rtol=0)
    assert_close(ops.masked_var(w, m), torch.tensor(1.0, dtype=F64), atol=1e-6, rtol=0)
    assert torch.all(w[~m] == 0)


CONSTANTS = [0.9, 0.1, 0.3, 0.7, 1.0 / 3.0, -0.7]
SIZES = [3, 6, 7, 8, 9]


def test_masked_whiten_and_var_of_constant_are_zero():
    # x constant -> x - mean = 0 and var = 0 exactly -> whitened value 0.
    # regression: a float32 mean 1 ulp off, divided by a ~1e-8 "std", whitened 3x3 of 0.9 to -0.814
    for value in CONSTANTS:
        for n in SIZES:
            x = torch.full((n, 3), value)
            m = torch.ones(n, 3, dtype=torch.bool)
            assert ops.masked_var(x, m).item() == 0.0, (value, n)
            assert_close(ops.masked_whiten(x, m), torch.zeros(n, 3), atol=1e-6, rtol=0)


def test_group_std_of_identical_members_is_zero():
    # regression: float32 group means of e.g. 3 x 0.9 were 1 ulp off, giving std 6e-8 instead of 0
    for value in CONSTANTS:
        for n in SIZES:
            v = torch.full((n,), value)
            ids = torch.zeros(n, dtype=torch.long)
            assert torch.all(ops.group_std(v, ids) == 0), (value, n)
            assert torch.all(ops.group_std(v, ids, unbiased=False) == 0), (value, n)
            assert torch.all(v - ops.group_mean(v, ids) == 0), (value, n)


def test_masked_reductions_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    m = torch.rand(3, 4, generator=g) > 0.3
    assert torch.autograd.gradcheck(lambda t: ops.masked_mean(t, m, dim=-1), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.masked_var(t, m), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.masked_whiten(t, m), (x,))


# =========================================================================== group statistics
# ids [7, 3, 7, 9, 3, 7] (unsorted, non-contiguous), values [1, 2, 3, 4, 6, 8]
#   group 7: rows 0, 2, 5 -> 1, 3, 8: sum 12, n 3, mean 4, dev -3, -1, 4, ss 26 -> var_u 13, var_b 26/3
#   group 3: rows 1, 4    -> 2, 6:    sum 8,  n 2, mean 4, dev -2, 2,    ss 8  -> var_u 8,  var_b 4
#   group 9: row 3        -> 4:       sum 4,  n 1, mean 4, std 0
#   leave-one-out: row0 (3+8)/2 = 5.5, row2 (1+8)/2 = 4.5, row5 (1+3)/2 = 2, row1 6, row4 2, row3 (singleton) 0
GID = torch.tensor([7, 3, 7, 9, 3, 7])
VAL = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 8.0], dtype=F64)


def test_group_index_hand():
    inv, n = ops.group_index(GID)
    assert n == 3
    assert inv.tolist() == [1, 0, 1, 2, 0, 1]  # sorted unique ids [3, 7, 9]


def test_group_stats_hand():
    assert_close(ops.group_sum(VAL, GID), torch.tensor([12.0, 8.0, 12.0, 4.0, 8.0, 12.0], dtype=F64))
    assert_close(ops.group_count(GID), torch.tensor([3.0, 2.0, 3.0, 1.0, 2.0, 3.0]))
    assert ops.group_count(GID, F64).dtype == F64
    assert_close(ops.group_mean(VAL, GID), torch.full((6,), 4.0, dtype=F64))
    s7, s3 = math.sqrt(13.0), math.sqrt(8.0)
    assert_close(ops.group_std(VAL, GID), torch.tensor([s7, s3, s7, 0.0, s3, s7], dtype=F64))
    b7 = math.sqrt(26.0 / 3.0)
    assert_close(ops.group_std(VAL, GID, unbiased=False), torch.tensor([b7, 2.0, b7, 0.0, 2.0, b7], dtype=F64))
    assert_close(ops.group_loo_mean(VAL, GID), torch.tensor([5.5, 6.0, 4.5, 0.0, 2.0, 2.0], dtype=F64))


def _loop_group(values, ids):
    v, g = values.tolist(), ids.tolist()
    out = {"sum": [], "count": [], "mean": [], "std_u": [], "std_b": [], "loo": []}
    for i in range(len(v)):
        members = [v[j] for j in range(len(v)) if g[j] == g[i]]
        n = len(members)
        mean = sum(members) / n
        ss = sum((x - mean) ** 2 for x in members)
        out["sum"].append(sum(members))
        out["count"].append(float(n))
        out["mean"].append(mean)
        out["std_u"].append(math.sqrt(ss / (n - 1)) if n > 1 else 0.0)
        out["std_b"].append(math.sqrt(ss / n))
        out["loo"].append((sum(members) - v[i]) / (n - 1) if n > 1 else 0.0)
    return {k: torch.tensor(x, dtype=F64) for k, x in out.items()}


@pytest.mark.parametrize("seed", range(6))
def test_group_stats_match_loops(seed):
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 20, (1,), generator=g))
    ids = torch.randint(0, 6, (B,), generator=g) * 11 - 20  # unsorted, non-contiguous, some negative
    vals = torch.randn(B, generator=g, dtype=F64)
    ref = _loop_group(vals, ids)
    assert_close(ops.group_sum(vals, ids), ref["sum"])
    assert_close(ops.group_count(ids, F64), ref["count"])
    assert_close(ops.group_mean(vals, ids), ref["mean"])
    assert_close(ops.group_std(vals, ids), ref["std_u"])
    assert_close(ops.group_std(vals, ids, unbiased=False), ref["std_b"])
    assert_close(ops.group_loo_mean(vals, ids), ref["loo"])


def test_group_mean_gradient_analytic():
    # d mean_g(i) / d v_j = [g_i == g_j] / n_g
    v = VAL.clone().requires_grad_(True)
    J = torch.autograd.functional.jacobian(lambda t: ops.group_mean(t, GID), v)
    same = (GID[:, None] == GID[None, :]).to(F64)
    assert_close(J, same / same.sum(1, keepdim=True))
    J = torch.autograd.functional.jacobian(lambda t: ops.group_loo_mean(t, GID), v)
    n = same.sum(1, keepdim=True)
    others = same - torch.eye(6, dtype=F64)
    assert_close(J, torch.where(n > 1, others / (n - 1).clamp_min(1), torch.zeros_like(others)))


def test_group_std_gradcheck():
    v = torch.tensor([1.0, 2.5, 3.0, 4.0, 6.0, 8.0], dtype=F64, requires_grad=True)
    ids = torch.tensor([7, 3, 7, 3, 3, 7])  # no singleton: sqrt(0) has no derivative
    assert torch.autograd.gradcheck(lambda t: ops.group_std(t, ids), (v,))


# =========================================================================== KL estimators
# logprobs [-1, -2, -0.5], ref [-1.5, -1, -0.5] -> d = [0.5, -1, 0]
#   k1 = d = [0.5, -1, 0]
#   k2 = d^2/2 = [0.125, 0.5, 0]
#   k3 = exp(-d) - 1 + d = [e^-0.5 - 0.5, e^1 - 2, 0] = [0.10653066, 0.71828183, 0]
LP = torch.tensor([-1.0, -2.0, -0.5], dtype=F64)
REF = torch.tensor([-1.5, -1.0, -0.5], dtype=F64)


def test_kl_hand():
    assert_close(ops.kl_estimate(LP, REF, "k1"), torch.tensor([0.5, -1.0, 0.0], dtype=F64))
    assert_close(ops.kl_estimate(LP, REF, "k2"), torch.tensor([0.125, 0.5, 0.0], dtype=F64))
    exp = torch.tensor([math.exp(-0.5) - 0.5, math.e - 2.0, 0.0], dtype=F64)
    assert_close(ops.kl_estimate(LP, REF, "k3"), exp)
    assert_close(exp[:2], torch.tensor([0.10653066, 0.71828183], dtype=F64), atol=1e-8, rtol=0)
    assert_close(ops.kl_estimate(LP, REF), exp)  # k3 is the default


def test_k3_nonnegative_and_zero_at_equal():
    g = torch.Generator().manual_seed(0)
    lp, ref = -torch.rand(200, generator=g) * 10, -torch.rand(200, generator=g) * 10
    assert (ops.kl_estimate(lp, ref, "k3") >= 0).all()
    assert torch.equal(ops.kl_estimate(lp, lp, "k3"), torch.zeros(200))
    assert torch.equal(ops.kl_estimate(lp, lp, "k1"), torch.zeros(200))


def test_k1_k3_unbiased_over_exact_distribution():
    # sum_y pi(y) k(y) = KL(pi || ref) exactly for k1 and k3 (E_pi[ref/pi] = 1)
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(7, generator=g, dtype=F64), -1)
    ref = torch.log_softmax(torch.randn(7, generator=g, dtype=F64), -1)
    kl = (lp.exp() * (lp - ref)).sum()
    for est in ("k1", "k3"):
        assert_close((lp.exp() * ops.kl_estimate(lp, ref, est)).sum(), kl)


def test_kl_gradients_analytic_and_none_into_ref():
    # d k1/d lp = 1, d k2/d lp = d, d k3/d lp = 1 - exp(-d)
    d = LP - REF
    for est, grad in (("k1", torch.ones(3, dtype=F64)), ("k2", d), ("k3", 1 - torch.exp(-d))):
        lp, ref = LP.clone().requires_grad_(True), REF.clone().requires_grad_(True)
        ops.kl_estimate(lp, ref, est).sum().backward()
        assert_close(lp.grad, grad)
        assert ref.grad is None


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_finite_at_extreme_logprobs(est):
    lp = torch.tensor([-50.0, 0.0, -50.0], requires_grad=True)
    ref = torch.tensor([0.0, -50.0, -50.0])
    out = ops.kl_estimate(lp, ref, est)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(lp.grad).all()
    if est == "k3":  # d clamped to +-20: exp(20) - 1 - 20 and exp(-20) - 1 + 20
        assert_close(out.double(), torch.tensor([math.expm1(20) - 20, math.expm1(-20) + 20, 0.0], dtype=F64),
                     rtol=1.3e-6, atol=0)


def test_kl_abs_and_straight_through_hand():
    # d = [0.5, -1, 0]: abs = [0.5, 1, 0]; the "+" forms keep the named value and take k2's gradient d
    d = LP - REF
    assert_close(ops.kl_estimate(LP, REF, "abs"), torch.tensor([0.5, 1.0, 0.0], dtype=F64))
    for est in ("k1", "k2", "k3", "abs"):
        lp = LP.clone().requires_grad_(True)
        out = ops.kl_estimate(lp, REF, est + "+")
        assert_close(out.detach(), ops.kl_estimate(LP, REF, est))
        out.sum().backward()
        assert_close(lp.grad, d)  # d(d^2/2)/d lp = d, whichever value is reported


def test_k3_clamp_hand():
    # d = -3.5: k3 = e^3.5 - 1 - 3.5 = 28.615...; clamped at 10 (verl's value); d = 0.5 is untouched
    lp, ref = torch.tensor([-4.0, -1.0], dtype=F64), torch.tensor([-0.5, -1.5], dtype=F64)
    assert_close(ops.kl_estimate(lp, ref, "k3"), torch.tensor([math.exp(3.5) - 4.5, math.exp(-0.5) - 0.5], dtype=F64))
    assert_close(ops.kl_estimate(lp, ref, "k3", 10.0), torch.tensor([10.0, math.exp(-0.5) - 0.5], dtype=F64))
    x = lp.clone().requires_grad_(True)
    ops.kl_estimate(x, ref, "k3+", 10.0).sum().backward()  # value clamped, gradient still k2's
    assert_close(x.grad, lp - ref)
    assert_close(ops.kl_estimate(lp, ref, "k1", 10.0), lp - ref)  # the clamp is k3's only


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k4"):
        ops.kl_estimate(LP, REF, "k4")


# =========================================================================== ratios
def test_token_ratio_hand_and_gradient():
    # lp - old = [0.5, -1] -> r = [e^0.5, e^-1]; d r/d lp = r; no gradient into old
    lp = torch.tensor([-1.0, -2.0], dtype=F64, requires_grad=True)
    old = torch.tensor([-1.5, -1.0], dtype=F64, requires_grad=True)
    r = ops.token_ratio(lp, old)
    assert_close(r, torch.tensor([math.exp(0.5), math.exp(-1.0)], dtype=F64))
    r.sum().backward()
    assert_close(lp.grad, r.detach())
    assert old.grad is None


def test_token_ratio_clamped_finite():
    r = ops.token_ratio(torch.tensor([0.0, -100.0]), torch.tensor([-100.0, 0.0]))
    assert_close(r.double(), torch.tensor([math.exp(20.0), math.exp(-20.0)], dtype=F64), rtol=1.3e-6, atol=0)


def test_sequence_ratio_hand_and_gradient():
    # row 0: mask [1, 1, 0], log r = [0.5, 0.5, (pad: 123)] -> mean 0.5 -> s = e^0.5
    # row 1: mask [1, 1, 1], log r = [0.3, -0.6, 0.0]     -> mean -0.1 -> s = e^-0.1
    # d s_i / d lp_{i,t} = s_i / |y_i| on valid tokens, 0 on padding
    lp = torch.tensor([[-1.0, -2.0, 100.0], [-0.7, -1.6, -1.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-1.5, -2.5, -23.0], [-1.0, -1.0, -1.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    s = ops.sequence_ratio(lp, old, mask)
    assert_close(s, torch.tensor([math.exp(0.5), math.exp(-0.1)], dtype=F64))
    assert_close(ops.sequence_log_ratio(lp, old, mask), torch.tensor([0.5, -0.1], dtype=F64))
    s.sum().backward()
    exp = torch.tensor([[math.exp(0.5) / 2] * 2 + [0.0], [math.exp(-0.1) / 3] * 3], dtype=F64)
    assert_close(lp.grad, exp)


@pytest.mark.parametrize("seed", range(3))
def test_sequence_ratio_is_geometric_mean_of_token_ratios(seed):
    g = torch.Generator().manual_seed(seed)
    lp, old = -torch.rand(4, 5, generator=g, dtype=F64), -torch.rand(4, 5, generator=g, dtype=F64)
    mask = torch.rand(4, 5, generator=g) > 0.3
    mask[:, 0] = True
    s = ops.sequence_ratio(lp, old, mask)
    r = ops.token_ratio(lp, old)
    for i in range(4):
        prod, n = 1.0, 0
        for t in range(5):
            if mask[i, t]:
                prod *= r[i, t].item()
                n += 1
        assert_close(s[i], torch.tensor(prod ** (1.0 / n), dtype=F64))


def test_response_lengths():
    m = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    out = ops.response_lengths(m)
    assert out.dtype == torch.float32
    assert out.tolist() == [2.0, 0.0, 2.0]


def test_token_hash_is_row_order_independent_and_ignores_masked_tokens():
    ids = torch.tensor([[3, 4, 9], [3, 4, 0], [5, 1, 2]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    h = ops.token_hash(ids, mask, seed=0)
    assert h[0] == h[1] and h[0] != h[2]  # the masked token 9 vs 0 does not count
    perm = torch.tensor([2, 0, 1])
    assert torch.equal(ops.token_hash(ids[perm], mask[perm], seed=0), h[perm])


def test_rank_in_group_by_key_then_tie():
    # group 7: keys [2, 1, 2] ties [0, 0, -1] -> order rows 1 (key 1), 2 (key 2, tie -1), 0 -> ranks [2, 0, 1]
    # group 3: keys [5, 4] -> ranks [1, 0]
    key = torch.tensor([2.0, 5.0, 1.0, 4.0, 2.0])
    tie = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0])
    gid = torch.tensor([7, 3, 7, 3, 7])
    assert ops.rank_in_group(key, tie, gid).tolist() == [2, 1, 0, 0, 1]


def test_fit_width_copies_the_common_columns_and_fills_the_rest():
    from lmpo.ops import fit_width

    like = torch.zeros(2, 3, dtype=torch.float64)
    wide = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    assert torch.equal(fit_width(wide, like), torch.tensor([[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]], dtype=torch.float64))
    narrow = torch.tensor([[1.0], [2.0]])
    got = fit_width(narrow, like, fill=9.0)
    assert got.dtype == torch.float64 and torch.equal(got, torch.tensor([[1.0, 9.0, 9.0], [2.0, 9.0, 9.0]], dtype=torch.float64))
