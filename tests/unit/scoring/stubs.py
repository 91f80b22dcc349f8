"""Judge backends and ensemble members for the scorer tests (imported by "module:function" specs)."""

from __future__ import annotations

import time

CALLS: list[list[str]] = []


def says_yes_when_right(texts: list[str]) -> list[str]:
    """A judge that answers yes when the text after "A:" equals the text after "Q:"."""
    CALLS.append(list(texts))
    out = []
    for t in texts:
        q, a = t.split("Q:")[1].split("A:")
        out.append("Yes, correct." if q.strip() == a.strip() else "No.")
    return out


def rambles(texts: list[str]) -> list[str]:
    return ["I cannot decide." for _ in texts]


def sleeps(texts: list[str]) -> list[str]:
    time.sleep(2.0)
    return ["yes" for _ in texts]


def length_score(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def first_digit(prompts, completions, **_):
    return [float(c[0]) if c[:1].isdigit() else 0.0 for c in completions]


def nan_on_empty(prompts, completions, **_):
    return [float("nan") if not c else 1.0 for c in completions]


def reads_first_digit(texts: list[str]) -> list[str]:
    """A CapRL answerer that knows one thing: the first character of the text is the digit asked about. It picks
    the option holding that digit, else the "cannot answer" option (always the last)."""
    out = []
    for t in texts:
        text = t.split("Text: ")[1].split("\nQuestion:")[0]
        opts = [line for line in t.splitlines() if len(line) > 2 and line[1] == "." and line[0].isupper()]
        pick = next((o[0] for o in opts if text[:1].isdigit() and o[3:] == text[:1]), opts[-1][0])
        out.append(f"{pick}")
    return out


_PRM = {}


def tiny_prm(prompt, completion, steps, **columns):
    """The process-credit step scorer of a PRM on the tiny model (built once): lmpo.rewards.prm.prm_step_scorer."""
    if "fn" not in _PRM:
        from lmpo.rewards.prm import prm_step_scorer

        _PRM["fn"] = prm_step_scorer("tiny", separator=" ")
    return _PRM["fn"](prompt, completion, steps, **columns)
