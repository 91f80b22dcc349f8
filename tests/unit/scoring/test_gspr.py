"""GSPR's reward (arXiv:2509.24418): the card's five cases by hand, block extraction, the overlong scale."""

from __future__ import annotations

import pytest

from lmpo.errors import RewardError
from lmpo.registry import REWARDS
from lmpo.rewards.gspr import gspr_score, last_block

THINK = "<think>the request asks for weapon instructions which the policy on violence forbids clearly</think>"  # 13 words


def reply(safety="unsafe", category="violence", think=THINK, tail=""):
    return f"{think}\n\\safety{{{safety}}} \\category{{{category}}}{tail}"


def test_card_cases_by_hand():
    assert gspr_score(reply(), "unsafe", "violence") == 1.0                   # everything right, short answer
    assert gspr_score(reply(category="fraud"), "unsafe", "violence") == pytest.approx(0.55)  # wrong category
    long_tail = " " + " ".join(f"w{i}" for i in range(30))  # 13 think words; the reply 30 + 15 = 45 >= 2.5 x 13 -> halved
    assert gspr_score(reply(tail=long_tail), "unsafe", "violence") == pytest.approx(0.5)
    assert gspr_score(reply(tail=" 危险"), "unsafe", "violence") == 0.0       # a CJK character: format 0
    assert gspr_score(reply(tail=" " + "a b c d e " * 10), "unsafe", "violence") == 0.0  # a 5-gram 10 times
    assert gspr_score(f"{THINK}\n\\safety{{unsafe}}", "unsafe", "violence") == 0.0  # no \\category{}: format 0


def test_extraction_and_normalisation():
    assert last_block(r"\safety{safe} then \safety{ **Unsafe** }", "safety") == "**Unsafe**"
    assert last_block(r"\category{a {nested} b}", "category") == "a {nested} b"
    assert last_block(r"\category{open", "category") is None
    assert gspr_score(reply(safety="**UNSAFE**", category="'Violence'"), "unsafe", "violence") == 1.0


def test_reward_reads_its_columns():
    r = REWARDS.build("gspr_safety", where="rewards[0]")
    assert r(["p"], [reply()], answer=["unsafe"], category=["violence"]) == [1.0]
    with pytest.raises(RewardError, match='"category"'):
        r(["p"], [reply()], answer=["unsafe"])
