"""Knapsack RL allocation (arXiv:2509.25849 Eq. 5-7): value function, exact DP, allocation rules, memory."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.pipeline import Pipeline
from lmpo.methods.plan.knapsack import KnapsackAllocation, knapsack_value, solve_knapsack

from factories import from_config, make_batch

F64 = torch.float64


def test_value_hand_cases():
    # Value(2, 0.5) = (1 - 0.25 - 0.25) * 0.5 * 0.25 = 0.0625
    # Value(2, 0.1) = (1 - 0.01 - 0.81) * 0.1 * 0.81 = 0.18 * 0.081 = 0.01458
    assert knapsack_value(2, 0.5).item() == pytest.approx(0.0625, abs=1e-15)
    assert knapsack_value(2, 0.1).item() == pytest.approx(0.01458, abs=1e-15)
    for n in (1, 2, 7):  # solved and unsolved prompts give no GRPO signal
        assert knapsack_value(n, 0.0).item() == 0.0 and knapsack_value(n, 1.0).item() == 0.0


def test_card_example_three_prompts():
    # p = (0.5, 0.1, 0.9), budget 12, N in [2, 8]: the exhaustive optimum is (5, 5, 2) with value 0.151977
    assert solve_knapsack([0.5, 0.1, 0.9], 12, 2, 8) == [5, 5, 2]
    total = sum(knapsack_value(n, p) for n, p in zip((5, 5, 2), (0.5, 0.1, 0.9)))
    assert total.item() == pytest.approx(0.151977, abs=1e-6)


def brute_force(p, budget, lo, hi):
    best, arg = -1.0, None
    for ns in itertools.product(range(lo, hi + 1), repeat=len(p)):
        if sum(ns) <= budget:
            v = sum(knapsack_value(n, q).item() for n, q in zip(ns, p))
            if v > best + 1e-15:
                best, arg = v, ns
    return best, arg


@pytest.mark.parametrize("seed", range(8))
def test_dp_matches_exhaustive_search(seed):
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, 5, (1,), generator=g))
    p = (torch.rand(k, generator=g) * 0.98 + 0.01).tolist()
    lo, hi = int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(3, 7, (1,), generator=g))
    budget = int(torch.randint(k * lo, k * hi + 3, (1,), generator=g))
    best, _ = brute_force(p, budget, lo, hi)
    got = solve_knapsack(p, budget, lo, hi)
    assert sum(got) <= budget and all(lo <= n <= hi for n in got)
    assert sum(knapsack_value(n, q).item() for n, q in zip(got, p)) == pytest.approx(best, rel=1e-12)


def test_value_gradient_in_p():
    # d/dp [(1 - p^N - (1-p)^N) p (1-p)^2] by the product rule, compared with autograd at N = 3
    p = torch.tensor([0.2, 0.5, 0.7], dtype=F64, requires_grad=True)
    knapsack_value(3, p).sum().backward()
    q = p.detach()
    f, df = 1 - q**3 - (1 - q) ** 3, -3 * q**2 + 3 * (1 - q) ** 2
    g, dg = q * (1 - q) ** 2, (1 - q) ** 2 - 2 * q * (1 - q)
    assert_close(p.grad, df * g + f * dg)


def trusted(k, rates, samples=16):
    """Fill ``k``'s buffers so each prompt's rate is exactly ``rates[key]`` over ``samples`` buffered rollouts."""
    for key, r in rates.items():
        hits = round(r * samples)
        assert hits == r * samples
        k.state["rewards"][key] = [1.0] * hits + [0.0] * (samples - hits)


def test_issue21_example_spends_whole_budget():
    # Issue 21: p = (0.05, 0.5, 1, 1), N = 8, budget 32 (lmpo used to give [8, 8, 2, 2], 20 of 32).
    # Released code (N_low 2, N_up 128, alpha 0.9): every trusted prompt starts at 2 -> 24 left.
    #   costs: log(0.1)/log(0.95) = 44.89 -> 44, log(0.1)/log(0.5) = 3.32 -> 3; 47 >= 24, so no fallback.
    #   DP fills 24 exactly: k0 + k1 = 24. Moving one rollout from p = 0.05 (N0) to p = 0.5 (N1) gains
    #   0.125 * 2^-N1 and loses 0.045125 * 0.05 * 0.95^(N0 - 1) (+ 0.05^N terms, negligible):
    #   N1 = 7 -> 8: 0.000977 > N0 = 21 -> 20: 0.000809 (move); N1 = 8 -> 9: 0.000488 < 0.000852 (stop).
    #   -> N = [20, 8, 2, 2], all 32 spent (checked by brute force over k1 below).
    k = KnapsackAllocation(buffer_size=20)  # p = 0.05 needs 20 samples (1 success)
    trusted(k, {"a": 0.05, "b": 0.5, "c": 1.0, "d": 1.0}, samples=20)
    got = k.allocate(["a", "b", "c", "d"], 8)
    assert got == [20, 8, 2, 2] and sum(got) == 32

    def gain(k_extra, p):
        return 0.0 if k_extra == 0 else knapsack_value(2 + k_extra, p).item()
    best = max(range(25), key=lambda j: (gain(24 - j, 0.05) + gain(j, 0.5), -j))
    assert (2 + 24 - best, 2 + best) == (20, 8)
    # the old cap N_up = N (the released function's default when no cap is passed) still spends everything:
    #   costs int(min(8, 44.89)) + int(3.32) = 8 + 3 = 11 < 24 -> fallback: 13 to the non-mixed prompts (no p = 0):
    #   +7, +6 -> 9, 8; the DP fills 11 with at most 6 extra each: (6, 5) since moving the last rollout from
    #   p = 0.05 (N 8 -> 7 loses 0.045125 * 0.05 * 0.95^7 = 0.00157) to p = 0.5 (N 7 -> 8 gains 0.000977) loses.
    capped = KnapsackAllocation(max_n=None, buffer_size=20)
    capped.load_state_dict(k.state_dict())
    assert capped.allocate(["a", "b", "c", "d"], 8) == [8, 7, 9, 8]


def like(k, **kw):
    """A KnapsackAllocation with other hyper-parameters and ``k``'s buffers."""
    out = KnapsackAllocation(**kw)
    out.load_state_dict(k.state_dict())
    return out


def test_cost_model_fallback():
    # p = (0.5, 0, 1, 1), N = 8: start 2 each -> 24 left; cost of p = 0.5 is int(3.32) = 3 < 24, so the surplus
    # 21 goes to the p = 0 prompt (23) and the DP fills exactly 3 on the mixed one (5): [5, 23, 2, 2] = 32.
    k = KnapsackAllocation()
    trusted(k, {"mix": 0.5, "zero": 0.0, "one": 1.0, "one2": 1.0})
    assert k.allocate(["mix", "zero", "one", "one2"], 8) == [5, 23, 2, 2]
    # no p = 0 prompt: the surplus 21 goes to every non-mixed prompt evenly (11, 10; the first takes the remainder)
    assert k.allocate(["mix", "one", "one2", "one"], 8) == [5, 2 + 7, 2 + 7, 2 + 7]
    # without the fallback the DP takes all 24 on the mixed prompt (k = 24 beats anything smaller: Value rises in N)
    assert like(k, fallback=False).allocate(
        ["mix", "zero", "one", "one2"], 8) == [26, 2, 2, 2]
    # expectation cost 1/(p(1-p)) - 1 = 3 at p = 0.5: the same plan here
    assert like(k, cost="expectation").allocate(
        ["mix", "zero", "one", "one2"], 8) == [5, 23, 2, 2]


def test_no_mixed_prompt_rules_and_trust():
    k = KnapsackAllocation(min_n=2)
    assert k.allocate(["a", "b"], 4) == [4, 4]  # unknown prompts: the nominal N
    trusted(k, {"zero": 0.0, "zero2": 0.0, "one": 1.0})
    # no mixed prompt: everything left goes to the p = 0 prompts evenly: 12 - 6 = 6 -> 3 + 3
    assert k.allocate(["zero", "one", "zero2"], 4) == [5, 2, 5]
    # no mixed and no p = 0 prompt: uniform N
    assert k.allocate(["one", "new"], 4) == [4, 4]
    # a prompt is trusted only after 8 buffered samples
    k.state["rewards"]["young"] = [1.0, 0.0] * 3 + [1.0]  # 7 samples
    assert k.rate("young") is None and k.rate("zero") == 0.0
    assert k.allocate(["young", "one"], 4) == [4, 4]


def test_observe_keeps_last_16_and_round_trips():
    k = KnapsackAllocation()
    p = Pipeline.assemble(planners=[k])  # a planner: budget allocator + step observer + state, never a selector
    assert p.hook("allocate") == k.allocate and p.calls("observe") == [k.observe] and p.stateful() == {"planner0": k}
    for step in range(3):  # 3 visits of 8 rollouts: "a" all fail then succeed; buffer keeps the last 16
        rewards = [float(step > 0)] * 8 + [1.0] * 4 + [0.0] * 4
        batch = make_batch(rewards, [0] * 8 + [1] * 8)
        batch.meta = [{"prompt_key": key} for key in ["a"] * 8 + ["b"] * 8]
        k.observe(batch)
    assert k.state["rewards"]["a"] == [1.0] * 16 and k.rate("a") == 1.0
    assert len(k.state["rewards"]["b"]) == 16 and k.rate("b") == 0.5
    fresh = KnapsackAllocation()
    fresh.load_state_dict(k.state_dict())
    assert fresh.allocate(["a", "b"], 3) == k.allocate(["a", "b"], 3)


def loop_official(rates, n, min_n, max_n, alpha, fallback=True):
    """Slow, loop-by-loop reading of the released allocation (rates: None = untrusted)."""
    B = len(rates)
    budget = [0] * B
    eff = []
    for i, r in enumerate(rates):
        if r is None:
            budget[i] = n
        else:
            budget[i] = min_n
            if 0 < r < 1:
                eff.append(i)
    left = n * B - sum(budget)
    zeros = [i for i, r in enumerate(rates) if r == 0.0]
    if left > 0 and not eff:
        if zeros:
            for j, i in enumerate(zeros):
                budget[i] += left // len(zeros) + (1 if j < left % len(zeros) else 0)
        else:
            budget = [n] * B
        return budget
    est = sum(int(min(max_n, math.log(1 - alpha) / math.log(max(rates[i], 1 - rates[i])))) for i in eff)
    cands = zeros or [i for i in range(B) if i not in eff]
    if fallback and est < left and cands:
        extra = left - est
        for j, i in enumerate(cands):
            budget[i] += extra // len(cands) + (1 if j < extra % len(cands) else 0)
        left = est
    kmax = max_n - min_n
    NEG = float("-inf")
    dp = [[NEG] * (left + 1) for _ in range(len(eff) + 1)]
    dp[0][0] = 0.0
    ch = [[0] * (left + 1) for _ in range(len(eff) + 1)]
    for a in range(1, len(eff) + 1):
        r = rates[eff[a - 1]]
        for w in range(left + 1):
            if dp[a - 1][w] > dp[a][w]:
                dp[a][w], ch[a][w] = dp[a - 1][w], 0
            for kk in range(1, min(kmax + 1, w + 1)):
                if dp[a - 1][w - kk] == NEG:
                    continue
                v = dp[a - 1][w - kk] + (1 - r ** (kk + min_n) - (1 - r) ** (kk + min_n)) * r * (1 - r) ** 2
                if v > dp[a][w]:
                    dp[a][w], ch[a][w] = v, kk
    w = left
    while w > 0 and dp[len(eff)][w] == NEG:
        w -= 1
    rest = left - w
    for a in range(len(eff), 0, -1):
        budget[eff[a - 1]] += ch[a][w]
        w -= ch[a][w]
    for j, i in enumerate(eff):
        budget[i] += rest // len(eff) + (1 if j < rest % len(eff) else 0)
    return budget


@pytest.mark.parametrize("seed", range(12))
def test_matches_loop_reference_of_released_rules(seed):
    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 7, (1,), generator=g))
    n = int(torch.randint(2, 9, (1,), generator=g))
    max_n = [None, 6, 12, 128][seed % 4]
    k = KnapsackAllocation(max_n=max_n, fallback=seed % 3 != 0)
    keys = [f"q{i}" for i in range(B)]
    for key in keys:
        size = int(torch.randint(5, 17, (1,), generator=g))  # some untrusted (< 8 samples)
        k.state["rewards"][key] = (torch.rand(size, generator=g) < torch.rand(1, generator=g)).float().tolist()
    rates = [k.rate(key) for key in keys]
    got = k.allocate(keys, n)
    exp = loop_official(rates, n, min(2, n), n if max_n is None else max_n, 0.9, fallback=seed % 3 != 0)
    assert got == exp and sum(got) == n * B


def test_validation():
    with pytest.raises(ConfigError, match="min_n"):
        from_config(KnapsackAllocation, min_n=0)
    with pytest.raises(ConfigError, match="max_n"):
        from_config(KnapsackAllocation, min_n=3, max_n=2)
    with pytest.raises(ConfigError, match="alpha"):
        from_config(KnapsackAllocation, alpha=1.0)
    with pytest.raises(ConfigError, match="min_samples"):
        from_config(KnapsackAllocation, min_samples=20, buffer_size=16)
