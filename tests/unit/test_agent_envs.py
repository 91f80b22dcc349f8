"""The built-in agent environments (toolmath, searchqa, FrozenLake's coordinates layout) and bad input in episode
rollouts: environments that raise, return wrong types, never end or print megabytes; tools that hang, crash or
return non-text; a model that emits garbage calls; checkpoint/resume of an episodes run."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest
import torch

from lmpo.config import load_config
from lmpo.envs import EnvError, build_env, checked_step, run_episode
from lmpo.envs.tool_env import ToolEnv
from lmpo.errors import ConfigError
from lmpo.models import build_tiny_model
from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.rewards.reward_set import RewardSet, RewardSpec
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.modes import build_train_generator
from lmpo.tools import ToolSet, build_tools
from lmpo.tools.search import Corpus, shipped_questions
from lmpo.train.rollouts import RolloutContext, score


def call(name: str, **arguments) -> str:
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


# --------------------------------------------------------------------------- toolmath
def test_toolmath_problems_are_seeded_products_solved_with_the_calculator():
    env = build_env("toolmath")
    q1, q2 = env.reset(7), build_env("toolmath").reset(7)
    assert q1 == q2 and q1 != env.reset(8)
    a, b = (int(x) for x in env.reset(7).removeprefix("What is ").removesuffix("?").split(" * "))
    assert 100 <= a <= 999 and 100 <= b <= 999 and env.target == str(a * b)
    replies = iter([call("calculator", expression=f"{a} * {b}"), f"Answer: {a * b}"])
    ep = run_episode(env, lambda msgs: next(replies), seed=7, max_turns=3)
    assert ep.done and ep.rewards == [0.0, 1.0]
    assert ep.messages[-2] == {"role": "tool", "name": "calculator", "content": str(a * b)}
    # the worked example sits between the system prompt and the question
    assert [m["role"] for m in ep.messages[:6]] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert "<tool_call>" in env.system_prompt and env.system_prompt_for(True) == env.system_prompt
    wrong = run_episode(env, lambda msgs: f"Answer: {a * b + 1}", seed=7)
    assert wrong.rewards == [0.0]


def test_toolmath_format_reward_is_paid_once_for_a_valid_call_only():
    env = build_env("toolmath", format_reward=0.2, operations="+-")
    env.reset(3)
    assert env.step(call("calculator", expr="1")).reward == 0.0  # bad arguments: no format reward
    assert env.step(call("calculator", expression="1 + 1")).reward == pytest.approx(0.2)
    assert env.step(call("calculator", expression="2 + 2")).reward == 0.0  # once per episode
    env.reset(4)
    assert env.step(call("calculator", expression="1 + 1")).reward == pytest.approx(0.2)  # reset re-arms it
    for bad in ({"digits": 0}, {"operations": "/"}, {"format_reward": 1.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_env("toolmath", **bad)


# --------------------------------------------------------------------------- searchqa
def test_searchqa_train_and_held_out_seeds_ask_different_questions_that_search_answers():
    env = build_env("searchqa", k=1)
    asked = {}
    for seed in range(32):
        asked[seed] = env.reset(seed)
    assert len(set(asked.values())) == 32  # seeds 0..31 cover the 32 questions once: a split is disjoint
    corpus = Corpus.shipped()
    by_q = {q["question"]: q for q in shipped_questions()}
    top1 = [corpus.search(q, 1)[0][0].id == by_q[q]["passage"] for q in asked.values()]
    assert sum(top1) == 31  # searching the question itself finds its passage first, but for one (found second)
    for question in asked.values():
        assert by_q[question]["passage"] in [p.id for p, _ in corpus.search(question, 2)], question
    env.reset(5)
    replies = iter([call("search", query=asked[5]), f"Answer: {env.target}"])
    ep = run_episode(env, lambda msgs: next(replies), seed=5)
    assert ep.done and ep.rewards == [0.0, 1.0] and env.target in ep.messages[-2]["content"]
    with pytest.raises(ConfigError, match="k must be"):
        build_env("searchqa", k=9)


# --------------------------------------------------------------------------- frozenlake layout
def test_frozenlake_coordinates_layout_and_first_word_parsing():
    env = build_env("frozenlake", coordinates=True, pick="first")
    first = env.reset(0).splitlines()
    assert first[2] == "   1 2 3 4" and first[3] == "1  P F F F"
    assert "You are at row 1, column 1. The goal G is at row 4, column 4." in first[-2]
    obs = env.step("Down. Then right, then right.").observation.splitlines()
    assert obs[2] == "2  P H F H" and "row 2, column 1" in obs[-2]  # the first direction word is the move
    plain = build_env("frozenlake")
    plain.reset(0)
    assert plain.step("not left but down").observation.splitlines()[1] == "P H F H"  # default: the last word
    with pytest.raises(ConfigError, match="pick"):
        build_env("frozenlake", pick="middle")


# --------------------------------------------------------------------------- bad input through the rollout
class Digits(ToolEnv):
    """The tiny model writes digits; each digit stands for one call a confused model might emit."""

    GARBAGE = {
        "0": '<tool_call>{"name": "calculator", "arguments": {"expression": 1 * 2}}</tool_call>',  # bad JSON
        "1": call("teleport", to="moon"),  # unknown tool
        "2": call("calculator", expr="1"),  # bad arguments
        "3": "<tool_call>{\"name\": \"calculator\"",  # never closed
        "4": call("hang"),  # hangs past the timeout
        "5": call("crash"),  # raises
        "6": call("blob"),  # returns a dict, not text
        "7": call("calculator", expression="2 + 2"),  # valid
    }
    system_prompt = ""  # the tiny tokenizer spells characters: keep the prompt short

    def __init__(self):
        def hang() -> str:
            """Never returns in time."""
            time.sleep(5)
            return "late"

        def crash() -> str:
            """Raises."""
            raise RuntimeError("tool exploded")

        def blob() -> dict:
            """Returns a dict."""
            return {"a": [1, 2]}

        super().__init__(ToolSet([build_tools(["calculator"]).functions["calculator"], hang, crash, blob],
                                 timeout=0.2))

    def problem(self, seed):
        return "1=", "1"

    def step(self, action):
        digit = next((c for c in action if c.isdigit()), "8")
        return super().step(self.GARBAGE.get(digit, "Answer: 1"))


class Raises:
    def reset(self, seed=None):
        return "1="

    def step(self, action):
        raise KeyError("boom")


class WrongTypes(Raises):
    def step(self, action):
        return ["1="], "1", 1, None


class Forever(Raises):
    def step(self, action):
        return "1=", 0.0, False, {}


class Chatty(Raises):
    def step(self, action):
        return "2=" * 3_000_000, 0.0, False, {}  # 6 MB


class ChattyReset(Raises):
    def reset(self, seed=None):
        return "1=" * 1_000_000  # 2 MB


@pytest.fixture(autouse=True)
def bad_envs(monkeypatch):
    mod = types.ModuleType("bad_envs")
    for cls in (Digits, Raises, WrongTypes, Forever, Chatty, ChattyReset):
        setattr(mod, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "bad_envs", mod)


def episodes(env: str, rows, n, *, max_turns=3, max_context=200, max_new_tokens=2):
    model, tok = build_tiny_model(seed=0, init_std=0.1), build_tiny_tokenizer()
    gen = build_train_generator("episodes", {"env": env, "max_turns": max_turns, "max_context_tokens": max_context},
                                model, tok)
    ctx = RolloutContext(generator=gen, tokenizer=tok, reward_set=RewardSet.from_specs([RewardSpec("env_return")]),
                         params=SamplingParams(max_new_tokens=max_new_tokens), num_generations=n)
    torch.manual_seed(0)
    return score(ctx, rows, n, ctx.params)


def test_garbage_calls_and_bad_tools_are_masked_counted_failures():
    rows = [{"prompt": "1", "env_seed": 0}]
    start = time.perf_counter()
    batch = episodes("bad_envs:Digits", rows, 8, max_turns=4)
    assert time.perf_counter() - start < 60  # hanging tools cost their timeout, not their sleep
    ex = batch.extras
    # replay every episode's replies through the environment: the rollout counted exactly what happened
    tok = build_tiny_tokenizer()
    expected_calls, expected_bad, expected_errors = [], [], []
    for b in range(batch.batch_size):
        replies = [tok.decode(batch.response_ids[b][batch.response_mask[b] & (batch.turn_ids[b] == t)].tolist(),
                              skip_special_tokens=True) for t in range(int(ex["num_turns"][b]))]
        env = Digits()
        env.reset(0)
        m = [checked_step(env, r).info["tool_metrics"] for r in replies]
        expected_calls.append(sum(x["calls"] for x in m))
        expected_bad.append(sum(x["invalid"] for x in m))
        expected_errors.append(sum(x["errors"] + x["timeouts"] for x in m))
    assert ex["tool_calls"].tolist() == expected_calls and ex["invalid_tool_calls"].tolist() == expected_bad
    assert ex["tool_errors"].tolist() == expected_errors
    assert sum(expected_bad) > 0 and sum(expected_errors) > 0  # the seed exercises both kinds
    # tool results (error messages included) are observations: attended to, never trained
    assert not (batch.response_mask & ~batch.extras["policy_mask"]).any()
    assert (batch.response_attn & ~batch.response_mask).any()
    assert torch.isfinite(batch.rewards).all()


def test_tool_failures_answer_the_model_in_text():
    env = Digits()
    env.reset(0)
    said = {d: checked_step(env, d).info["messages"][0]["content"] for d in "0123456"}
    assert said["0"].startswith("invalid call: the text inside <tool_call> is not valid JSON")
    assert said["1"].startswith("invalid call: unknown tool 'teleport'")
    assert said["2"].startswith("invalid call: calculator: missing required argument")
    assert said["3"] == "invalid call: <tool_call> without a closing </tool_call>."
    assert said["4"] == "error: hang timed out after 0.2 s."
    assert said["5"] == "error: crash raised RuntimeError: tool exploded"
    assert json.loads(said["6"]) == {"a": [1, 2]}  # non-text results are JSON-encoded


@pytest.mark.parametrize("env, phrase", [("Raises", "raised on action"), ("WrongTypes", "returned bad values")])
def test_environment_that_raises_or_returns_wrong_types_is_a_clear_error(env, phrase):
    with pytest.raises(EnvError, match=rf"{env}.*{phrase}"):
        episodes(f"bad_envs:{env}", [{"prompt": "1", "env_seed": 0}], 2)


def test_environment_that_raises_stops_training_with_a_clear_cli_error(tmp_path, capsys):
    from lmpo.cli import main

    code = main(["train", "configs/tiny.yaml", "task.name=env", "task.params={num_train: 4, num_eval: 1}",
                 "rollout.mode=episodes", "rollout.mode_params={env: 'bad_envs:WrongTypes', max_turns: 2}",
                 "rollout.prompts_per_step=1", "rollout.num_generations=2", "train.steps=1", "eval.every=0",
                 f"output.dir={tmp_path}", "output.progress=false"])
    err = capsys.readouterr().err
    assert code != 0 and "lmpo: error:" in err and "WrongTypes.step returned bad values" in err
    assert "reward is '1'" in err and "done is 1" in err and "Traceback" not in err


def test_environment_that_never_ends_is_cut_at_max_turns_and_marked_truncated():
    batch = episodes("bad_envs:Forever", [{"prompt": "1", "env_seed": 0}], 3, max_turns=4, max_context=400)
    assert (batch.extras["num_turns"] == 4).all() and batch.truncated.all()
    assert (batch.extras["episode_done"] == 0).all()


def test_environment_that_prints_megabytes_is_cut_and_the_context_budget_holds():
    start = time.perf_counter()
    batch = episodes("bad_envs:Chatty", [{"prompt": "1", "env_seed": 0}], 2, max_turns=3, max_context=9000)
    assert time.perf_counter() - start < 60
    total = batch.prompt_mask.sum(-1) + batch.response_attn.sum(-1)
    assert (total <= 9000).all() and batch.truncated.all()
    assert (batch.response_attn & ~batch.response_mask).sum(-1).max() <= 8100  # 6 MB cut to 8000 characters
    step = checked_step(Chatty(), "1")
    assert step.info["observation_truncated"] and len(step.observation) < 8100
    # where not even one cut observation fits, the episode ends at the budget instead
    batch = episodes("bad_envs:Chatty", [{"prompt": "1", "env_seed": 0}], 2, max_turns=3, max_context=300)
    assert (batch.extras["num_turns"] == 1).all() and batch.truncated.all()


def test_first_observation_over_the_context_budget_is_a_clear_error():
    from lmpo.errors import DataError

    with pytest.raises(DataError, match="first prompt.*max_context_tokens=500"):
        episodes("bad_envs:ChattyReset", [{"prompt": "1", "env_seed": 0}], 2, max_context=500)


# --------------------------------------------------------------------------- checkpoint / resume
def _episodes_cfg(out, steps):
    return load_config("configs/tiny.yaml", [
        "task.name=env", "task.params={num_train: 16, num_eval: 2, instructions: '1+1'}",
        "rollout.mode=episodes", "rollout.mode_params={env: 'bad_envs:Digits', max_turns: 2, max_context_tokens: 400}",
        "rollout.prompts_per_step=2", "rollout.num_generations=2", "rollout.max_new_tokens=2",
        f"train.steps={steps}", "eval.every=2", f"output.dir={out}", "output.run_name=r", "output.checkpoint_every=1",
        "output.progress=false", "output.plot=false", "train.threads=1",
    ])


def test_episodes_run_resumed_from_a_checkpoint_matches_the_uninterrupted_run(tmp_path):
    from lmpo.train.loop import train

    whole = train(_episodes_cfg(tmp_path / "a", 3)).history
    train(_episodes_cfg(tmp_path / "b", 1))  # stopped after step 1 (as if killed while collecting step 2's episodes)
    resumed = train(_episodes_cfg(tmp_path / "b", 3), resume=True).history

    def steady(row):  # everything but timings and thread probes
        return {k: v for k, v in row.items() if not k.startswith("perf/") and "time" not in k}

    tail = [steady(r) for r in whole if r["step"] >= 2]
    assert [steady(r) for r in resumed if r["step"] >= 2] == tail
    assert any("rollout/tool_calls" in r and r["rollout/tool_calls"] > 0 for r in tail)


# --------------------------------------------------------------------------- TRL compatibility
def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather in a city (a TRL / transformers tool, as written for `GRPOTrainer(tools=[...])`).

    Args:
        city: The city name.
        unit: The temperature unit. (choices: ["celsius", "fahrenheit"])
    """
    return f"21 degrees {unit} in {city}"


def brevity(completions, **kwargs) -> list[float]:
    """A TRL reward function: (completions, **kwargs) -> list[float]."""
    assert "env_return" in kwargs and "env_seed" in kwargs  # the episode's return and the row's columns come along
    return [-len(c) / 100 for c in completions]


class Weather(ToolEnv):
    def __init__(self):
        super().__init__(ToolSet([get_weather]))  # the TRL tools list, unchanged

    def problem(self, seed):
        return "How warm is it in Oslo?", "21"


def test_trl_tools_and_reward_functions_work_unchanged(tmp_path, monkeypatch):
    schema = ToolSet([get_weather]).schemas[0]["function"]
    assert schema["name"] == "get_weather" and schema["parameters"]["required"] == ["city"]
    assert schema["parameters"]["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    replies = iter([call("get_weather", city="Oslo"), "Answer: 21"])
    ep = run_episode(Weather(), lambda msgs: next(replies), seed=0)
    assert ep.rewards == [0.0, 1.0] and ep.messages[-2]["content"] == "21 degrees celsius in Oslo"
    # a TRL reward function next to the episode return, in an episodes run
    mod = types.ModuleType("trl_rewards")
    mod.brevity = brevity
    monkeypatch.setitem(sys.modules, "trl_rewards", mod)
    from lmpo.train.loop import train

    cfg = load_config("configs/tiny.yaml", [
        "task.name=env", "task.params={num_train: 8, num_eval: 2, instructions: '1+1'}",
        "rollout.mode=episodes", "rollout.mode_params={env: 'bad_envs:Forever', max_turns: 2, max_context_tokens: 64}",
        "rewards=[{name: env_return}, {name: 'trl_rewards:brevity', weight: 0.5}]",
        "rollout.prompts_per_step=2", "rollout.num_generations=2", "rollout.max_new_tokens=3", "train.steps=1",
        "eval.every=0", f"output.dir={tmp_path}", "output.checkpoint_every=0", "output.progress=false",
        "output.plot=false", "train.threads=1",
    ])
    last = train(cfg).history[-1]
    keys = [k for k in last if "brevity" in k]
    assert keys and all(last[k] < 0 for k in keys if k.startswith("reward/")), last
