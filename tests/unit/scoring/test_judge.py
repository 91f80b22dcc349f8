"""judge: verdict parsing by hand, a user backend (batching, caching, timeouts, unparsable verdicts), a tiny LM
judge end to end."""

from __future__ import annotations

import time

import pytest

from lmpo.errors import ConfigError, RewardError
from lmpo.registry import REWARDS
from lmpo.rewards.judge import parse_verdict
from unit.scoring import stubs

TEMPLATE = "Q:{prompt}A:{completion}"


def build(**kw):
    return REWARDS.build("judge", where="rewards[0]", **{"template": TEMPLATE, **kw})


@pytest.mark.parametrize("text, how, pattern, max_score, want", [
    ("Yes, it is right.", "yes_no", None, 1.0, 1.0),
    ("no", "yes_no", None, 1.0, 0.0),
    ("Nothing to say; yesterday", "yes_no", None, 1.0, None),  # "yesterday" is not the word "yes"
    ("Score: 7 out of 10", "number", None, 10.0, 1.0),         # the LAST number: 10 / 10
    ("Score: 7", "number", None, 10.0, 0.7),
    ("no number", "number", None, 1.0, None),
    ("Rating: 4/5", "regex", r"Rating: (\d+)", 5.0, 0.8),
    ("no rating", "regex", r"Rating: (\d+)", 5.0, None),
    ("[[PASS]]", "regex", r"\[\[PASS\]\]", 1.0, 1.0),          # a group-less pattern: match -> 1, none -> 0
    ("[[FAIL]]", "regex", r"\[\[PASS\]\]", 1.0, 0.0),
])
def test_parse_verdict_by_hand(text, how, pattern, max_score, want):
    assert parse_verdict(text, how, pattern, max_score) == (want if want is None else pytest.approx(want))


def test_backend_judge_batches_and_judges_each_pair_once():
    stubs.CALLS.clear()
    j = build(backend="unit.scoring.stubs:says_yes_when_right", batch_size=2)
    out = j(["1", "1", "1", "2"], ["1", "3", "1", "2"])
    assert out == [1.0, 0.0, 1.0, 1.0]
    assert [len(c) for c in stubs.CALLS] == [2, 1]  # 3 distinct judge prompts, batches of 2
    assert j(["1"], ["3"]) == [0.0] and len(stubs.CALLS) == 2  # greedy verdicts are cached across calls
    assert j.pop_metrics() == {"cache_hits": 2.0}


def test_sampled_verdicts_are_not_cached_and_are_averaged():
    stubs.CALLS.clear()
    j = build(backend="unit.scoring.stubs:says_yes_when_right", temperature=1.0, num_samples=3, batch_size=8)
    assert j(["1"], ["1"]) == [1.0] and j(["1"], ["1"]) == [1.0]
    assert [len(c) for c in stubs.CALLS] == [3, 3]


def test_unparsable_verdicts_are_masked_and_counted_or_an_error():
    j = build(backend="unit.scoring.stubs:rambles")
    assert j(["1", "1"], ["1", "2"]) == [0.0, 0.0]
    assert j.pop_metrics() == {"unparsable": 2.0, "failures": 2.0}
    with pytest.raises(RewardError, match="unparsable verdict 'I cannot decide.'"):
        build(backend="unit.scoring.stubs:rambles", on_failure="error")(["1"], ["1"])


def test_a_judge_that_times_out_is_masked_counted_and_does_not_block():
    j = build(backend="unit.scoring.stubs:sleeps", timeout_s=0.2)
    t0 = time.perf_counter()
    assert j(["1", "2"], ["1", "2"]) == [0.0, 0.0]
    assert time.perf_counter() - t0 < 1.5
    assert j.pop_metrics() == {"timeouts": 2.0, "failures": 2.0}
    with pytest.raises(RewardError, match="timed out"):
        build(backend="unit.scoring.stubs:sleeps", timeout_s=0.1, on_failure="error")(["1"], ["1"])


def test_tiny_lm_judge_end_to_end_is_deterministic_when_greedy():
    j = build(model="tiny", template="{prompt}{completion}=", parse="number", max_score=1000, max_new_tokens=3)
    a = j(["1=", "2="], ["1", "2"])
    assert all(0 <= x <= 1 for x in a) and a == build(model="tiny", template="{prompt}{completion}=", parse="number",
                                                      max_score=1000, max_new_tokens=3)(["1=", "2="], ["1", "2"])
    j2 = build(model="tiny", template="{prompt}{completion}=", parse="number", timeout_s=1e-9)
    assert j2(["1="], ["1"]) == [0.0] and j2.pop_metrics()["timeouts"] == 1.0


@pytest.mark.parametrize("kw, msg", [
    ({"template": "no fields"}, "must contain {completion}"),
    ({"parse": "regex"}, "needs a pattern"),
    ({"parse": "regex", "pattern": "("}, "not a valid regex"),
])
def test_bad_judge_configs(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        build(backend="unit.scoring.stubs:rambles", **kw)
