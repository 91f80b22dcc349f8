"""ARIES thought-graph environment on sorting (arXiv:2502.21208): transitions by hand and the card's properties."""

from __future__ import annotations

import pytest

from lmpo.envs import build_env, run_episode
from lmpo.envs.aries_sort import AriesSortEnv, got_schedule
from lmpo.errors import ConfigError


def test_decompose_adds_exactly_two_children_and_transitions_by_hand():
    env = AriesSortEnv(length=4, capacity=2)
    env.nodes = []
    env.reset(0)
    env.nodes[0].items = [4, 1, 3, 2]
    _, r, d, info = env.step("decompose 0")
    assert [n.items for n in env.nodes] == [[4, 1, 3, 2], [4, 1], [3, 2]] and env.nodes[0].children == [1, 2]
    assert (r, d, info["invalid_action"]) == (0.0, False, False)
    assert env.step("1 0")[3]["invalid_action"]  # a node is decomposed once (digit op code 1 = decompose)
    env.step("solve 1"), env.step("2 2")
    assert (env.nodes[1].attempt, env.nodes[2].attempt) == ([1, 4], [2, 3])
    _, r, d, _ = env.step("aggregate 0")
    assert env.nodes[0].attempt == [1, 2, 3, 4] and (r, d) == (1.0, True)


def test_reasoner_limits_and_refine_by_hand():
    env = AriesSortEnv(length=4, capacity=2)
    env.reset(0)
    env.nodes[0].items = [4, 1, 3, 2]
    env.step("solve 0")  # 4 > capacity: sorted with the first two distinct neighbours swapped
    assert env.nodes[0].attempt == [2, 1, 3, 4] and env.errors(env.nodes[0]) == 2
    _, r, d, _ = env.step("refine 0")  # one bubble pass: [1, 2, 3, 4]
    assert env.nodes[0].attempt == [1, 2, 3, 4] and (r, d) == (1.0, True)


def test_illegal_actions_change_nothing():
    env = AriesSortEnv()
    first = env.reset(1)
    for bad in ("aggregate 0", "refine 0", "solve 9", "jump 0", ""):
        obs, r, d, info = env.step(bad)
        assert info["invalid_action"] and obs == first and (r, d) == (0.0, False)


def got_reference(xs, env):
    """Static GoT written out directly: split to capacity, reasoner-sort the leaves, merge upwards."""
    if len(xs) <= env.capacity:
        return env.reason_sort(xs)
    h = len(xs) // 2
    return env.reason_merge([got_reference(xs[:h], env), got_reference(xs[h:], env)])


@pytest.mark.parametrize("seed", range(5))
def test_card_fixed_schedule_policy_reproduces_the_static_got_baseline(seed):
    env = build_env("aries_sort", length=8, capacity=2)
    env.reset(seed)
    plan = iter(got_schedule(env))
    ep = run_episode(env, lambda messages: next(plan), seed=seed, max_turns=30)
    assert env.nodes[0].attempt == got_reference(env.nodes[0].items, env) == sorted(env.nodes[0].items)
    assert ep.done and ep.total_reward == 1.0 and ep.turns == len(got_schedule(env))


def test_an_adaptive_policy_needs_fewer_transformations_than_the_schedule():
    """The point of ARIES: a policy that looks at the graph (solve the root, refine while wrong) beats the fixed
    schedule's cost on this reasoner (10 transformations for 8 items)."""
    env = build_env("aries_sort", length=8, capacity=2)

    def policy(messages):
        return "solve 0" if env.nodes[0].attempt is None else "refine 0"

    costs = [run_episode(env, policy, seed=s, max_turns=30) for s in range(5)]
    assert all(e.done for e in costs) and max(e.turns for e in costs) < 10


def test_bad_params():
    with pytest.raises(ConfigError, match="aries_sort"):
        AriesSortEnv(length=1)
