"""Built-in rewards, RewardSet weighting, and every reward error path."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from lmpo.errors import ConfigError, DataError, RewardError
from lmpo.registry import REWARDS
from lmpo.rewards import (
    AnswerTagFormat,
    ExactMatch,
    FinalNumber,
    MathVerify,
    PrefixMatch,
    RewardSet,
    RewardSpec,
    extract_tag,
    resolve_reward,
)


def score(fn, completions, answers=None, **columns):
    if answers is not None:
        columns["answer"] = answers
    return fn(prompts=["p"] * len(completions), completions=completions, **columns)


def test_builtins_are_registered():
    for name in ("math_verify", "final_number", "exact_match", "answer_tag_format", "prefix_match", "reasoning_gym"):
        assert name in REWARDS


@pytest.mark.parametrize(
    "completion, answer, want",
    [
        ("12 + 110 = 122", "122", 1.0),
        ("The answer is 122.", "122", 1.0),  # trailing full stop
        ("so 120.", 120, 1.0),  # integer gold
        ("Total: 1,234", "1234", 1.0),  # thousands separator in the completion
        ("Total: 1234", "1,234", 1.0),  # ... or in the gold
        ("x = -42", "-42", 1.0),
        ("3-5", "-2", 0.0),  # "-5" here is subtraction, the last number is 5
        ("it is 0.50", "0.5", 1.0),
        ("122 is wrong, it is 123", "122", 0.0),  # only the LAST number counts
        ("122 apples (step 3)", "122", 0.0),
        ("no digits here", "5", 0.0),
        ("", "5", 0.0),
        ("1,2345", "2345", 1.0),  # not a valid thousands group: read as 1 and 2345
        ("\u22127", "-7", 1.0),  # unicode minus
    ],
)
def test_final_number(completion, answer, want):
    assert score(FinalNumber(), [completion], [answer]) == [want]


def test_final_number_bad_gold_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match="not a number"):
        score(FinalNumber(), ["5"], ["five"])


def test_math_verify():
    completions = [
        "<answer>\\frac{1}{2}</answer>",
        "The answer is $0.5$",
        "zzz {{{ \\frac{",  # garbage must score 0, not raise
        "<answer></answer> 3",  # an empty answer block is wrong even if a number follows
        "x^2+1",
        "so \\boxed{1,234}",
        "<answer>7</answer>",
    ]
    answers = ["0.5", "1/2", "1", "3", "x^2+1", "1234", "8"]
    assert score(MathVerify(), completions, answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_exact_match():
    assert score(ExactMatch(), ["  Paris \n", "paris", "<answer>Paris</answer> bla"], ["Paris"] * 3) == [1.0, 0.0, 1.0]
    assert score(ExactMatch(case_sensitive=False), ["paris"], ["Paris"]) == [1.0]
    assert score(ExactMatch(use_answer_tag=False), ["<answer>Paris</answer>"], ["Paris"]) == [0.0]


def test_answer_tag_format():
    fn = AnswerTagFormat()
    got = score(fn, ["a <answer>4</answer>", "no tag", "<answer>1</answer><answer>2</answer>", "</answer>x<answer>"])
    assert got == [1.0, 0.0, 0.0, 0.0]
    assert score(AnswerTagFormat(tag="final"), ["<final>4</final>"]) == [1.0]
    assert extract_tag("<answer> 1 </answer> <answer> 2 </answer>") == "2"


def test_prefix_match_is_dense():
    got = score(PrefixMatch(), ["123", "12x", "1", "923", "1234", ""], ["123"] * 6)
    assert got == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 1.0, 0.0])


def test_rewards_ignore_unknown_columns():
    assert score(FinalNumber(), ["7"], ["7"], extra=["x"], rg_index=[3]) == [1.0]


def test_reward_set_weights_and_components():
    rs = RewardSet.from_specs([RewardSpec("final_number", weight=2.0), RewardSpec("answer_tag_format", 0.5)])
    assert rs.names == ["final_number", "answer_tag_format"] and rs.weights == [2.0, 0.5]
    total, comps = rs(
        ["q1", "q2", "q3"], ["<answer>5</answer>", "5", "<answer>4</answer>"], {"answer": ["5", "5", "5"]}
    )
    assert comps.dtype == torch.float32 and comps.shape == (3, 2)
    assert comps.tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    assert total.dtype == torch.float32 and total.tolist() == [2.5, 2.0, 0.5]


def test_reward_set_accepts_names_and_mappings_and_dedupes_names():
    rs = RewardSet.from_specs(["exact_match", {"name": "exact_match", "kwargs": {"case_sensitive": False}}])
    assert rs.names == ["exact_match", "exact_match_2"]
    _, comps = rs(["q"], ["ABC"], {"answer": ["abc"]})
    assert comps.tolist() == [[0.0, 1.0]]
    with pytest.raises(ConfigError, match='Unknown key "wieght".*weight'):
        RewardSet.from_specs([{"name": "exact_match", "wieght": 2}])
    with pytest.raises(ConfigError, match="final_number"):
        RewardSet.from_specs(["final_numbr"])
    with pytest.raises(ConfigError, match="case_sensitive"):
        RewardSet.from_specs([RewardSpec("exact_match", kwargs={"case_sensitve": True})])


def _set(fn):
    return RewardSet(["mine"], [fn], [1.0])


def test_raising_function_names_function_and_sample():
    def fn(prompts, completions, **kw):
        return [1.0 / (len(c) - 3) for c in completions]  # divides by zero on 3-character completions

    with pytest.raises(RewardError) as err:
        _set(fn)(["a", "b", "the third prompt"], ["long one", "xyz", "abc"], {})
    msg = str(err.value)
    assert '"mine"' in msg and "ZeroDivisionError" in msg and "sample 1" in msg and "'xyz'" in msg


def test_long_prompts_are_truncated_in_errors():
    def fn(prompts, completions, **kw):
        raise KeyError("boom")

    with pytest.raises(RewardError) as err:
        _set(fn)(["x" * 500], ["y" * 500], {})
    assert "sample 0" in str(err.value) and len(str(err.value)) < 400


@pytest.mark.parametrize(
    "returned, match",
    [
        ([1.0], "returned 1 values for a batch of 2"),
        ([1.0, float("nan")], "non-finite value nan for sample 1"),
        ([float("inf"), 0.0], "non-finite value inf for sample 0"),
        ([1.0, None], "returned None for sample 1"),
        ([1.0, "1.0"], "for sample 1"),
        (1.0, "expected a list of 2 floats"),
    ],
)
def test_bad_return_values(returned, match):
    with pytest.raises(RewardError, match=match) as err:
        _set(lambda prompts, completions, **kw: returned)(["a", "b"], ["c", "d"], {})
    assert '"mine"' in str(err.value)


def test_tensor_returns_and_batch_shape_checks():
    total, _ = _set(lambda prompts, completions, **kw: torch.ones(2))(["a", "b"], ["c", "d"], {})
    assert total.tolist() == [1.0, 1.0]
    with pytest.raises(DataError, match='column "answer" has 1 values'):
        _set(lambda prompts, completions, **kw: [0.0, 0.0])(["a", "b"], ["c", "d"], {"answer": ["x"]})


def test_user_reward_by_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            NOT_CALLABLE = 3
            def length(completions, **kw):
                return [float(len(c)) for c in completions]
            def scaled(completions, scale=1.0, **kw):
                return [scale * len(c) for c in completions]
            @dataclass
            class Const:
                value: float = 1.0
                def __call__(self, prompts, completions, **kw):
                    return [self.value] * len(completions)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rs = RewardSet.from_specs(
        ["my_rewards:length", RewardSpec("my_rewards:scaled", kwargs={"scale": 2.0}), {"name": "my_rewards:Const"}]
    )
    _, comps = rs(["p"], ["abc"], {"answer": ["z"]})
    assert comps.tolist() == [[3.0, 6.0, 1.0]]
    with pytest.raises(ConfigError, match='module "no_such_mod" could not be imported'):
        resolve_reward("no_such_mod:fn")
    with pytest.raises(ConfigError, match='has no attribute "lenght".*"length"'):
        resolve_reward("my_rewards:lenght")
    with pytest.raises(ConfigError, match="not a callable"):
        resolve_reward("my_rewards:NOT_CALLABLE")
    sys.modules.pop("my_rewards", None)


def test_reward_set_empty_is_rejected():
    with pytest.raises(ConfigError, match="at least one"):
        RewardSet.from_specs([])
    with pytest.raises(ConfigError, match="non-finite weight"):
        RewardSet.from_specs([RewardSpec("final_number", weight=math.inf)])


def test_math_verify_works_off_the_main_thread():
    import threading

    out: list = []
    worker = threading.Thread(target=lambda: out.append(score(MathVerify(), ["\\boxed{3}", "4"], ["3", "3"])))
    worker.start()
    worker.join()
    assert out == [[1.0, 0.0]]  # SIGALRM timeouts are unavailable here; the reward must not raise
