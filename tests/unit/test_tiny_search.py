"""The ``tiny_search`` environment and the per-turn tool-call counts of ``rollout.mode: episodes``."""

from __future__ import annotations

import pytest
import torch

from lmpo.envs import build_env, run_episode
from lmpo.errors import ConfigError
from lmpo.models import build_tiny_model
from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.rewards.reward_set import RewardSet, RewardSpec
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.modes import build_train_generator, mode_extras
from lmpo.train.rollouts import RolloutContext, score


def seed_of(known: bool, retry: bool = False) -> int:
    env = build_env("tiny_search", known_fraction=0.5, retry=retry)
    return next(s for s in range(100) if (env.reset(s), env.known)[1] == known)


def scripted(replies):
    it = iter(replies)
    return lambda messages: next(it)


def test_known_question_is_answered_by_copying_and_hidden_needs_a_search():
    env = build_env("tiny_search")
    s = seed_of(True)
    q = env.reset(s)
    assert q[1] == "=" and env.answer == q[0]
    ep = run_episode(build_env("tiny_search"), scripted([q[0]]), seed=s, max_turns=3)
    assert ep.rewards == [1.0] and ep.done
    s = seed_of(False)
    q = env.reset(s)
    assert q[1] == "+"
    ep = run_episode(build_env("tiny_search"), scripted(["+", env.answer]), seed=s, max_turns=3)
    assert ep.rewards == [0.0, 1.0] and ep.infos[0]["tool_metrics"] == {"calls": 1, "valid": 1}
    assert ep.infos[1]["searches"] == 1
    wrong = str((int(env.answer) + 1) % 10)
    assert run_episode(build_env("tiny_search"), scripted([wrong]), seed=s, max_turns=3).rewards == [0.0]
    # retry: a wrong answer shows the question again, and a later search still succeeds
    ep = run_episode(build_env("tiny_search", retry=True), scripted([wrong, "+", env.answer]), seed=s, max_turns=3)
    assert ep.rewards == [0.0, 0.0, 1.0]
    env = build_env("tiny_search", retry=True)
    env.reset(s)
    assert env.step(wrong)[:3] == (q, 0.0, False)
    # invalid replies are observations, never errors
    ep = run_episode(build_env("tiny_search"), scripted(["=", " "]), seed=s, max_turns=2)
    assert ep.infos[0]["invalid_action"] and not ep.done


def test_known_fraction_and_errors():
    env = build_env("tiny_search", known_fraction=1.0)
    assert all(env.reset(s)[1] == "=" for s in range(30))
    env = build_env("tiny_search", known_fraction=0.0)
    assert all(env.reset(s)[1] == "+" for s in range(30))
    with pytest.raises(ConfigError, match="known_fraction"):
        build_env("tiny_search", known_fraction=1.5)
    with pytest.raises(ConfigError, match="retry"):
        build_env("tiny_search", retry=[1])


def test_episodes_record_tool_calls_per_turn():
    model, tok = build_tiny_model(seed=0, init_std=0.1), build_tiny_tokenizer()
    gen = build_train_generator("episodes", {"env": "tiny_search", "env_params": {"known_fraction": 0.0, "retry": True},
                                             "max_turns": 3, "max_context_tokens": 64}, model, tok)
    ctx = RolloutContext(generator=gen, tokenizer=tok, reward_set=RewardSet.from_specs([RewardSpec("env_return")]),
                         params=SamplingParams(max_new_tokens=1), num_generations=16)
    torch.manual_seed(0)
    batch = score(ctx, [{"prompt": "=", "env_seed": 5}], 16, ctx.params)
    tc = batch.extras["turn_tool_calls"]
    assert "turn_tool_calls" in mode_extras("episodes") and tc.shape == (16, 3)
    assert torch.equal(tc.sum(-1), batch.extras["tool_calls"])
    for b in range(16):
        for t in range(int(batch.extras["num_turns"][b])):
            reply = tok.decode(batch.response_ids[b][batch.response_mask[b] & (batch.turn_ids[b] == t)].tolist(),
                               skip_special_tokens=True)
            assert tc[b, t] == float(reply.strip()[:1] == "+"), (b, t, reply)
        assert (tc[b, int(batch.extras["num_turns"][b]):] == 0).all()
    assert tc.sum() > 0


def test_require_search_refuses_lucky_guesses_on_hidden_questions():
    env = build_env("tiny_search", require_search=True, retry=True)
    s = seed_of(False)
    env.reset(s)
    assert env.step(env.answer)[1:3] == (0.0, False)  # right digit, but not looked up: wrong, retried
    env.step("+")
    assert env.step(env.answer)[1:3] == (1.0, True)
    s = seed_of(True)
    q = env.reset(s)
    assert env.step(q[0])[1:3] == (1.0, True)  # known questions need no search
    with pytest.raises(ConfigError, match="require_search"):
        build_env("tiny_search", require_search=[1])
