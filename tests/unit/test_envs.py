"""Text environments: the protocol and its checks, the ENVS registry and ``module:Class``, the Gymnasium adapter."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

from lmpo.envs import (
    ENVS,
    Env,
    EnvError,
    FrozenLakeEnv,
    GymnasiumEnv,
    ToolEnv,
    build_env,
    checked_reset,
    checked_step,
    contains_answer,
    observation_messages,
    run_episode,
)
from lmpo.errors import ConfigError
from lmpo.tools import build_tools

needs_gym = pytest.mark.skipif(importlib.util.find_spec("gymnasium") is None, reason="needs lmpo[agents] (gymnasium)")


class Counter:
    """A user's environment: say numbers in order up to ``n``; reward 1 per right number."""

    system_prompt = "Count."

    def __init__(self, n: int = 3):
        self.n = n

    def reset(self, seed=None):
        self.i = 0
        return "Say 1."

    def step(self, action):
        right = action.strip() == str(self.i + 1)
        self.i += right
        return f"Say {self.i + 1}.", float(right), self.i >= self.n, {"right": right}


@pytest.fixture
def user_module(monkeypatch):
    mod = types.ModuleType("my_envs")
    mod.Counter, mod.NotAnEnv = Counter, dict
    monkeypatch.setitem(sys.modules, "my_envs", mod)
    return mod


@needs_gym
def test_registry_lists_builtins_and_rejects_unknown_names_and_keys():
    assert {"frozenlake", "gymnasium"} <= set(ENVS.names())
    with pytest.raises(ConfigError, match='Did you mean "frozenlake"'):
        build_env("frozenlak")
    with pytest.raises(ConfigError, match='Did you mean "is_slippery"'):
        build_env("frozenlake", is_slipery=True)
    assert isinstance(build_env("frozenlake", is_slippery="false"), FrozenLakeEnv)  # config strings are coerced


def test_module_class_builds_the_users_env(user_module):
    env = build_env("my_envs:Counter", n=2)
    assert isinstance(env, Env) and env.n == 2
    episode = run_episode(env, lambda msgs: str(len(msgs) // 2), seed=0)
    assert episode.done and episode.rewards == [1.0, 1.0] and episode.turns == 2
    assert [m["role"] for m in episode.messages] == ["system", "user", "assistant", "user", "assistant"]
    with pytest.raises(ConfigError, match='no attribute "Countr".*Did you mean "Counter"'):
        build_env("my_envs:Countr")
    with pytest.raises(ConfigError, match="could not be imported"):
        build_env("no_such_module_xyz:Env")
    with pytest.raises(ConfigError, match="without reset"):
        build_env("my_envs:NotAnEnv")
    with pytest.raises(ConfigError, match="Cannot build"):
        build_env("my_envs:Counter", m=1)


def test_run_episode_stops_at_max_turns(user_module):
    episode = run_episode(Counter(n=5), lambda msgs: "wrong", max_turns=3)
    assert not episode.done and episode.turns == 3 and episode.total_reward == 0.0


class Broken:
    def __init__(self, out=None, raises=False):
        self.out, self.raises = out, raises

    def reset(self, seed=None):
        if self.raises:
            raise RuntimeError("boom")
        return self.out

    def step(self, action):
        if self.raises:
            raise RuntimeError("boom")
        return self.out


def test_checked_calls_turn_bad_environments_into_clear_errors():
    with pytest.raises(EnvError, match="raised in reset.*RuntimeError: boom"):
        checked_reset(Broken(raises=True), 0)
    with pytest.raises(EnvError, match="returned a int"):
        checked_reset(Broken(out=3), 0)
    with pytest.raises(EnvError, match="raised on action"):
        checked_step(Broken(raises=True), "x")
    with pytest.raises(EnvError, match=r"\(observation, reward, done, info\)"):
        checked_step(Broken(out="obs"), "x")
    with pytest.raises(EnvError, match="observation is a int.*reward is 'x'.*done is 1.*info is a list"):
        checked_step(Broken(out=(1, "x", 1, [])), "x")
    with pytest.raises(EnvError, match="finite"):
        checked_step(Broken(out=("o", float("nan"), False, {})), "x")
    step = checked_step(Broken(out=("y" * 100, 1, True, {})), "x", max_chars=10)
    assert step.observation.startswith("y" * 10) and "truncated" in step.observation
    assert step.info["observation_truncated"] and step.reward == 1.0 and isinstance(step.reward, float)


def test_observation_messages_default_to_user_and_honour_info_messages():
    assert observation_messages("hi") == [{"role": "user", "content": "hi"}]
    tool = [{"role": "tool", "name": "calculator", "content": "4"}]
    assert observation_messages("4", {"messages": tool}) == tool


def scripted(env, actions, seed=0):
    first = env.reset(seed)
    steps = [env.step(a) for a in actions]
    return first, steps


@needs_gym
def test_frozenlake_scripted_path_reaches_the_goal():
    env = build_env("frozenlake")
    first, steps = scripted(env, ["down", "Down.", "I go right", "<action>down</action>", "right", "right"])
    assert "P F F F" in first and "left, down, right or up" in first
    *middle, last = steps
    assert all(s.reward == 0.0 and not s.done and not s.info["invalid_action"] for s in middle)
    assert last.done and last.reward == 1.0 and last.info["terminated"] and "reached the goal" in last.observation
    assert last.observation.splitlines()[3] == "H F F P"


@needs_gym
def test_frozenlake_hole_ends_the_episode_with_no_reward():
    _, steps = scripted(build_env("frozenlake"), ["right", "down"])
    assert steps[-1].done and steps[-1].reward == 0.0 and "fell into a hole" in steps[-1].observation
    assert steps[-1].observation.splitlines()[1] == "F P F H"


@needs_gym
def test_frozenlake_invalid_action_is_an_observation_not_a_crash():
    env = build_env("frozenlake")
    env.reset(0)
    for bad in ["jump!", "", "<tool_call>{}</tool_call>", "\x00" * 5]:
        obs, reward, done, info = env.step(bad)
        assert "Invalid action" in obs and "left, down, right, up" in obs and "P F F F" in obs
        assert info["invalid_action"] and reward == 0.0 and not done
    assert env.invalid_actions == 4
    assert env.step("not left but down").observation.splitlines()[1] == "P H F H"  # the last action word wins


@needs_gym
def test_frozenlake_episode_through_the_checked_loop_and_turn_limit():
    moves = iter(["down", "down", "right", "down", "right", "right"])
    episode = run_episode(build_env("frozenlake"), lambda msgs: next(moves), seed=0, max_turns=10)
    assert episode.done and episode.total_reward == 1.0 and episode.turns == 6


@needs_gym
def test_frozenlake_random_map_is_a_function_of_the_seed():
    env = build_env("frozenlake", random_map=True, size=5)
    a, b, c = env.reset(1), env.reset(1), env.reset(2)
    assert a == b and a != c and len(a.splitlines()[-1].split()) == 5


@needs_gym
def test_gymnasium_adapter_wraps_any_discrete_env():
    env = build_env("gymnasium", env_id="CliffWalking-v1", action_words=["up", "right", "down", "left"])
    assert isinstance(env, GymnasiumEnv) and env.reset(0) == "36"
    _, reward, _, info = env.step("right")  # stepping off the start along the bottom row is the cliff
    assert reward == -100.0 and not info["invalid_action"]
    assert env.step("sideways").info["invalid_action"]
    plain = build_env("gymnasium", env_id="FrozenLake-v1", make_kwargs={"is_slippery": False})
    plain.reset(0)
    assert plain.step("1").observation == "4" and plain.step("7").info["invalid_action"]
    with pytest.raises(ConfigError, match="Cannot make"):
        build_env("gymnasium", env_id="NoSuchEnv-v9")
    with pytest.raises(ConfigError, match="4 actions but action_words has 2"):
        build_env("gymnasium", env_id="FrozenLake-v1", action_words=["a", "b"])


# ---- tool environments -------------------------------------------------------------------------------------------


class Multiply(ToolEnv):
    """What is a * b? (a, b drawn from the seed.)"""

    def problem(self, seed):
        a, b = 1000 + seed, 37 + seed
        return f"What is {a} * {b}?", str(a * b)


def test_tool_env_answers_calls_with_tool_messages_and_scores_the_final_answer():
    env = Multiply(build_tools(["calculator"]))
    assert "<tool_call>" in env.system_prompt and '"calculator"' in env.system_prompt
    replies = iter([
        '<tool_call>{"name": "calculator", "arguments": {"expression": "1002 * 39"}}</tool_call>',
        '<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>',
        "Answer: 39,078",
    ])
    episode = run_episode(env, lambda msgs: next(replies), seed=2, max_turns=5)
    assert episode.done and episode.rewards == [0.0, 0.0, 1.0]
    roles = [m["role"] for m in episode.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert episode.messages[3] == {"role": "tool", "name": "calculator", "content": "39078"}
    assert episode.messages[5]["content"].startswith("invalid call: calculator: missing required argument")
    first, second, last = episode.infos
    assert first["assistant_message"]["tool_calls"][0]["function"]["name"] == "calculator"
    assert first["tool_metrics"]["valid"] == 1 and second["tool_metrics"]["bad_arguments"] == 1
    assert last["target"] == "39078"


@pytest.mark.parametrize(
    "answer, reward",
    [("Answer: 39078", 1.0), ("the result is 39,078.", 1.0), ("Answer: 390780", 0.0), ("39078.5", 0.0),
     ("I think 39078 but Answer: 12", 0.0), ("", 0.0)],
)
def test_contains_answer(answer, reward):
    assert contains_answer(answer, "39078") == reward


def test_the_documented_examples_work():
    """docs/agents.md's environment and tool, executed as written."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "agents.md").read_text()
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", doc, re.S):
        exec(block, namespace)
    env = namespace["GuessNumber"]()
    assert isinstance(env, Env)
    state = {"low": 1, "high": 20, "guess": None}

    def bisect(messages):  # a policy: binary search on the environment's hints
        hint = messages[-1]["content"]
        if hint == "Higher.":
            state["low"] = state["guess"] + 1
        elif hint == "Lower.":
            state["high"] = state["guess"] - 1
        state["guess"] = (state["low"] + state["high"]) // 2
        return f"My guess: {state['guess']}"

    episode = run_episode(env, bisect, seed=6)
    assert episode.done and episode.total_reward == 1.0 and episode.turns <= 5
    tools = build_tools([namespace["convert"]])
    turn = tools.respond('<tool_call>{"name": "convert", "arguments": {"amount": 10, "unit": "ft"}}</tool_call>')
    assert float(turn.messages[0]["content"]) == pytest.approx(3.048)
    bad = tools.respond('<tool_call>{"name": "convert", "arguments": {"amount": 10, "unit": "yd"}}</tool_call>')
    assert bad.metrics["bad_arguments"] == 1
    replies = iter(['<tool_call>{"name": "convert", "arguments": {"amount": 12, "unit": "ft"}}</tool_call>',
                    "Answer: 3.6576"])
    episode = run_episode(namespace["Convert"](), lambda msgs: next(replies), seed=2)
    assert episode.rewards == [0.0, 1.0] and float(episode.messages[-2]["content"]) == pytest.approx(3.6576)
    assert namespace["brevity"](["ab", "abcd"], env_return=[1.0, 0.0]) == [-0.002, -0.004]
