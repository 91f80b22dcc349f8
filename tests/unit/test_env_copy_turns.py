"""The tiny multi-turn task ``copy_turns``: observations, per-turn rewards, the two error modes, bad parameters."""

from __future__ import annotations

import pytest

from lmpo.envs import build_env, run_episode
from lmpo.errors import ConfigError


def _copier(messages):
    return messages[-1]["content"][0]  # the digit before "="


def test_copying_every_turn_returns_one_and_ends_after_turns():
    env = build_env("copy_turns", turns=3)
    ep = run_episode(env, _copier, seed=5, max_turns=10)
    assert ep.done and ep.rewards == [pytest.approx(1 / 3)] * 3 and ep.total_reward == pytest.approx(1.0)
    shown = [m["content"] for m in ep.messages if m["role"] == "user"]
    assert len(shown) == 3 and all(len(s) == 2 and s[0].isdigit() and s[1] == "=" for s in shown)


def test_same_seed_same_digits_and_wrong_replies_earn_nothing():
    a, b = build_env("copy_turns", turns=4), build_env("copy_turns", turns=4)
    assert a.reset(11) == b.reset(11)
    digits = [a.digit]
    for _ in range(3):
        obs, r, done, info = a.step("x")  # never right: "next" moves on regardless
        assert r == 0.0 and not done and info["invalid_action"]
        digits.append(obs[0])
    assert a.step(digits[-1]) == ("", 0.25, True, {"invalid_action": False})
    b.step(digits[0])
    assert b.step("x")[0][0] == digits[2]  # the observations do not depend on the replies


def test_repeat_mode_shows_the_digit_again_after_a_wrong_reply():
    env = build_env("copy_turns", turns=3, on_error="repeat")
    first = env.reset(2)
    wrong = "0" if first[0] != "0" else "1"
    assert env.step(wrong)[:3] == (first, 0.0, False)  # retried: the same observation
    obs, r, done, _ = env.step(first[0])
    assert r == pytest.approx(1 / 3) and not done
    assert env.step(obs[0])[1:3] == (pytest.approx(1 / 3), True)  # ends after 3 replies, 2 of them right


@pytest.mark.parametrize("params, key", [({"turns": 0}, "turns"), ({"on_error": "skip"}, "on_error")])
def test_bad_parameters_name_the_key(params, key):
    with pytest.raises(ConfigError, match=key):
        build_env("copy_turns", **params)
