"""Knapsack RL allocation (arXiv:2509.25849 Eq. 5-7): value function, exact DP, allocation rules, memory."""

from __future__ import annotations

import itertools

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


def test_allocation_rules_and_budget():
    k = KnapsackAllocation(min_n=2)
    # unvisited prompts all get the nominal N
    assert k.allocate(["a", "b"], 4) == [4, 4]
    k.state["success"].update({"mix": 0.5, "zero": 0.0, "one": 1.0})
    # budget 4 x 4 = 16; solved/unsolved get 2, the unvisited 4; "mix" takes the DP's N_up = 4; the leftover
    # 16 - (4 + 2 + 2 + 4) = 4 moves to the unsolved prompt (fallback)
    assert k.allocate(["mix", "zero", "one", "new"], 4) == [4, 6, 2, 4]
    # no unsolved prompt: the surplus stays unspent
    assert k.allocate(["mix", "one"], 4) == [4, 2]
    # a larger N_up lets the DP move the budget of the solved prompt to the mixed one
    big = KnapsackAllocation(max_n=8)
    big.state["success"].update({"mix": 0.5, "one": 1.0})
    assert big.allocate(["mix", "one"], 4) == [6, 2]


def test_planner_provides_allocation_and_memory_round_trips():
    k = KnapsackAllocation()
    p = Pipeline.assemble(planners=[k])  # a planner: budget allocator + step observer + state, never a selector
    assert p.hook("allocate") == k.allocate and p.calls("observe") == [k.observe] and p.stateful() == {"planner0": k}
    batch = make_batch([1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
    batch.meta = [{"prompt_key": key} for key in ("a", "a", "b", "b")]
    k.observe(batch)
    assert k.state["success"] == {"a": 0.5, "b": 1.0}
    fresh = KnapsackAllocation()
    fresh.load_state_dict(k.state_dict())
    assert fresh.allocate(["a", "b"], 3) == k.allocate(["a", "b"], 3) == [3, 2]


def test_validation():
    with pytest.raises(ConfigError, match="min_n"):
        from_config(KnapsackAllocation, min_n=0)
    with pytest.raises(ConfigError, match="max_n"):
        from_config(KnapsackAllocation, min_n=3, max_n=2)
