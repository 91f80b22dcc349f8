"""CapRL (arXiv:2509.22647): shuffling keeps the right answer's text (card test 1), an empty reply scores 0 when the
answerer says it cannot answer (test 2), the reward is the fraction answered right (test 3), letters parsed."""

from __future__ import annotations

import random

import pytest

from lmpo.errors import RewardError
from lmpo.registry import REWARDS
from lmpo.rewards.caprl import CANNOT, parse_letter, shuffled_options

Q = [{"question": "first digit?", "options": [str(d) for d in range(10)], "answer": "3"}]


def test_shuffle_keeps_the_answer_text_and_appends_cannot_answer():
    for seed in range(20):
        opts, letter = shuffled_options(["a", "b", "c", "d"], "c", random.Random(seed))
        assert opts[-1] == CANNOT and sorted(opts[:-1]) == ["a", "b", "c", "d"]
        assert opts["ABCDE".index(letter)] == "c"
    with pytest.raises(RewardError, match="not one of the options"):
        shuffled_options(["a"], "z", random.Random(0))


def test_parse_letter():
    assert parse_letter("The answer is B.", 5) == "B" and parse_letter("A", 5) == "A"
    assert parse_letter("I think F", 5) is None and parse_letter("Answer: cannot", 5) is None and parse_letter(None, 3) is None


def test_reward_is_the_fraction_answered_right():
    r = REWARDS.build("caprl", where="rewards[0]", backend="unit.scoring.stubs:reads_first_digit")
    qs = [Q[0], {**Q[0], "answer": "4"}, {**Q[0], "answer": "3"}, {**Q[0], "answer": "3"}]  # 3 of 4 answer "3"
    assert r(["p", "p"], ["37", ""], questions=[qs, qs]) == [0.75, 0.0]  # "" -> "cannot answer" -> 0
    assert r.pop_metrics() == {"unanswered": 0.0}
    assert r(["p"], ["3"], questions=[Q]) == r(["p"], ["3"], questions=[Q])  # seeded shuffles
    with pytest.raises(RewardError, match='"questions" column'):
        r(["p"], ["3"])
