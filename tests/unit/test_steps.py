"""lmpo.rewards.steps: step spans, token offsets (tiny and SmolLM2 tokenizers), step-end tokens, placement, checks."""

from __future__ import annotations

import math

import pytest

from lmpo.models.tiny import build_tiny_tokenizer
from lmpo.rewards.steps import (CopySteps, EquationSteps, _prefix_ends, check_scores, place_steps, resolve_scorer,
                                split_steps, step_end_tokens, token_char_ends)
from lmpo.errors import ConfigError

from factories import smollm2_tokenizer


def test_split_steps_by_hand():
    # "a\n\nbc\n\n\n\n d \n\n": pieces "a" (0,1), "bc" (3,5), "" dropped, " d " -> "d" at 10, trailing "" dropped
    assert split_steps("a\n\nbc\n\n\n\n d \n\n") == [(0, 1), (3, 5), (10, 11)]
    assert split_steps("no separator here") == [(0, 17)]  # one step
    assert split_steps("   ") == [] and split_steps("") == []
    assert split_steps("1 2  3", " ") == [(0, 1), (2, 3), (5, 6)]
    assert split_steps("Step 1: x Step 2: y", pattern=r"Step \d: ") == [(8, 9), (18, 19)]
    with pytest.raises(ConfigError, match="separator"):
        split_steps("x", "")


def test_tiny_tokenizer_offsets_are_one_per_character():
    tok = build_tiny_tokenizer()
    ids = tok("12 3+4=7", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert token_char_ends(tok, ids) == [1, 2, 3, 4, 5, 6, 7, 8, 8, 8]  # special tokens end where the last one did


TEXTS = ["Step 1: 3+4=7.\n\nStep 2: 7*2=14 héllo 😀\n\nSo the answer is 14.", "日本語の文章です。\n\n答えは４２😀😀",
         "a\n\n\n\nb  \n\n  c\n\n", "x😀\n\n😀y", " leading space\n\nand words merged across\n\nboundaries"]


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_offsets_equal_prefix_decoding(text):
    """The tokenizer's offsets (fast path) and decoding growing prefixes (the reference) agree; a character split
    across byte-level tokens ends on the token that completes it."""
    tok = smollm2_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ends = token_char_ends(tok, ids)
    ref = [len(tok.decode(ids[:j + 1], skip_special_tokens=True).rstrip("\ufffd")) for j in range(len(ids))]
    ref = [max(ref[:j + 1]) for j in range(len(ref))]
    assert ends == ref == _prefix_ends(tok, ids)
    # every step's end token decodes (as a prefix) to a text that holds the whole step
    for s, e in split_steps(text):
        j = step_end_tokens(ends, [(s, e)])[0]
        assert tok.decode(ids[:j + 1], skip_special_tokens=True).startswith(text[:e])
        assert not tok.decode(ids[:j], skip_special_tokens=True).startswith(text[:e])


def test_smollm2_token_merging_across_a_boundary_merges_steps():
    """With " " as separator, byte-level BPE merges " 1" into one token: step ends still land on the right tokens."""
    tok = smollm2_tokenizer()
    text = "ab 12 cd"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ends = token_char_ends(tok, ids)
    pieces = [tok.decode([i]) for i in ids]
    got = step_end_tokens(ends, split_steps(text, " "))
    assert ["".join(pieces[:j + 1]) for j in got] == ["ab", "ab 12", "ab 12 cd"]


def test_step_end_tokens_and_placement_by_hand():
    # tokens "ab" "c\n" "\nd" "e": char ends 2, 4, 6, 7; steps "abc" (0,3) and "de" (5,7)
    ends = step_end_tokens([2, 4, 6, 7], [(0, 3), (5, 7)])
    assert ends == [1, 3]
    r, turn, merged = place_steps(ends, [0.5, -1.0], 5)  # 5 tokens: the last one (EOS) after the last step
    assert r.tolist() == [0.0, 0.5, 0.0, -1.0, 0.0] and turn.tolist() == [0, 0, 1, 1, 1] and merged == 0
    # two steps ending in one token (a token that merges across the boundary): their scores add up there
    r, turn, merged = place_steps([1, 1, 2], [0.25, 0.5, 1.0], 3)
    assert r.tolist() == [0.0, 0.75, 1.0] and turn.tolist() == [0, 0, 1] and merged == 1


def test_check_scores():
    assert check_scores([1, 0.5], 2) == ""
    assert "expected 2 scores" in check_scores([1.0], 2)
    assert "not finite" in check_scores([1.0, math.nan], 2)
    assert "numbers" in check_scores(None, 1) and "numbers" in check_scores(["x"], 1)


def test_rule_scorers_exact():
    eq = EquationSteps()
    assert eq("", "", ["3+4=7", "2*3=7", "no maths", "1+1=2 and 2+2=5", "12-5=7"]) == [1.0, -1.0, 0.0, -1.0, 1.0]
    cp = CopySteps()
    assert cp("37=", "", ["37", "3", "371"]) == [1.0, -1.0, 1.0]
    assert cp("x", "", ["5", "6"], answer="5") == [1.0, -1.0]
    assert resolve_scorer("equation_steps") == EquationSteps()
    with pytest.raises(ConfigError, match="equation_steps"):
        resolve_scorer("equation_step")
    with pytest.raises(ConfigError, match="cannot be imported"):
        resolve_scorer("no_such_module:f")
