"""Countdown: the exact checker (hand cases), deterministic generation, the task, the reward and the environment."""

from __future__ import annotations

import random

import pytest

from lmpo.envs import build_env
from lmpo.errors import ConfigError
from lmpo.registry import REWARDS
from lmpo.tasks import build_task
from lmpo.tasks.countdown import Equation, check_solution, combine, generate_puzzle, parse_equations


def test_parse_equations_reads_only_equations():
    assert parse_equations("first 3+5=8, then\n8 * 2 = 16; done 7÷7=1") == [
        Equation(3, "+", 5, 8), Equation(8, "*", 2, 16), Equation(7, "/", 7, 1)]
    assert parse_equations("3+5 is 8") == []


@pytest.mark.parametrize("a,op,b,want", [(7, "-", 3, 4), (3, "-", 7, None), (3, "-", 3, None), (8, "/", 2, 4),
                                         (7, "/", 2, None), (6, "*", 7, 42), (2, "+", 2, 4), (5, "/", 0, None)])
def test_combine_follows_the_rules(a, op, b, want):
    assert combine(a, op, b) == want


def test_checker_hand_cases():
    nums, target = [3, 5, 2, 7], 16
    assert check_solution(nums, target, "3+5=8\n8*2=16").solved
    v = check_solution(nums, target, "3+5=8 8*2=16 16+7=23")  # stops at the target: the extra line is ignored
    assert v.solved and v.valid_steps == 2 and v.pool == (7, 16)
    v = check_solution(nums, target, "3+5=9")  # false arithmetic
    assert not v.solved and v.valid_steps == 0 and "is 8, not 9" in v.error
    v = check_solution(nums, target, "3+5=8 3+8=11")  # 3 used twice
    assert not v.solved and v.valid_steps == 1 and "3 is not available" in v.error
    v = check_solution(nums, target, "2-7=5")  # negative intermediate (the equation is false anyway)
    assert not v.solved and "not a positive integer" in v.error
    assert not check_solution(nums, target, "3+5=8").solved
    assert not check_solution(nums, target, "16").solved
    assert not check_solution([8, 2], 16, "8*2=16", ops="+").solved  # operator not allowed
    assert check_solution([4, 4, 1], 9, "4+4=8 8+1=9").solved  # duplicates: each copy once


def test_generation_is_deterministic_and_solvable():
    kw = dict(num_count=4, steps=3, min_value=1, max_value=13, ops="+-*/", max_target=100)
    a = [generate_puzzle(random.Random(s), **kw) for s in range(30)]
    b = [generate_puzzle(random.Random(s), **kw) for s in range(30)]
    assert a == b
    for p in a:
        assert check_solution(p["numbers"], p["target"], p["solution"]).solved
        assert p["target"] not in p["numbers"] and p["target"] <= 100
        assert len(parse_equations(p["solution"])) == 3


def test_task_rows_reward_and_errors():
    t = build_task("countdown", num_train=6, num_eval=2, ops="+", num_count=3, steps=2, template="{numbers} {target}=")
    assert len(t.train) == 6 and len(t.eval) == 2
    assert t == build_task("countdown", num_train=6, num_eval=2, ops="+", num_count=3, steps=2,
                           template="{numbers} {target}=")
    r = t.train[0]
    assert r["prompt"] == f"{' '.join(map(str, r['numbers']))} {r['target']}="
    reward = REWARDS.build("countdown", ops="+")
    got = reward([r["prompt"]] * 3, [r["answer"], "1+1=3", ""], numbers=[r["numbers"]] * 3, target=[r["target"]] * 3)
    assert got == [1.0, 0.0, 0.0]
    half = REWARDS.build("countdown", ops="+", partial=1.0)
    first = r["answer"].split()[0]
    assert half([r["prompt"]], [first], numbers=[r["numbers"]], target=[r["target"]]) == [0.5]
    with pytest.raises(ConfigError, match="steps must be in 1..num_count-1"):
        build_task("countdown", num_count=3, steps=3)
    with pytest.raises(ConfigError, match="ops="):
        build_task("countdown", ops="+%")
    with pytest.raises(ValueError, match="numbers"):
        reward(["p"], ["1+1=2"])


def test_env_plays_the_planted_solution_and_ends_on_invalid():
    env = build_env("countdown", num_count=3, steps=2, ops="+")
    obs = env.reset(7)
    assert obs == env.reset(7) and obs.endswith("=")
    moves = env.solution.split()
    o, r, d, info = env.step(moves[0])
    assert (r, d, info["invalid_action"]) == (0.0, False, False) and o.endswith(f"{env.target}=")
    o, r, d, info = env.step(moves[1])
    assert (r, d, info["solved"]) == (1.0, True, True)
    env.reset(7)
    o, r, d, info = env.step("hello")
    assert (r, d, info["invalid_action"]) == (0.0, True, True)
    retry = build_env("countdown", on_invalid="retry")
    first = retry.reset(7)
    assert retry.step("9+9=19")[0] == first
    with pytest.raises(ConfigError, match="on_invalid"):
        build_env("countdown", on_invalid="skip")
