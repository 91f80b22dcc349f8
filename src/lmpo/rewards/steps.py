"""Process credit: a reply cut into steps, each step scored, each score put on the token that ends its step.

The pieces, each usable on its own (the ``process_credit`` planner, :mod:`lmpo.methods.plan.process_credit`, runs
them on every scoring round's batch):

- :func:`split_steps` -> character spans ``[(start, end), ...]`` of the steps of a reply, cut at a separator
  (``"\\n\\n"``, ``"\\n"``, ``" "``) or at the matches of a regular expression; empty pieces are dropped, and a reply
  with no separator is one step;
- :func:`token_char_ends` -> for every token of a reply, the end (exclusive) of its text in the decoded reply,
  from the tokenizer's own offsets when re-encoding the text gives back the sampled ids, else by decoding growing
  prefixes (robust to byte-level BPE, to tokens that merge across a step boundary and to special tokens);
- :func:`step_end_tokens` -> the token holding each step's last character (steps that end in the same token are
  merged: their scores add up there);
- :func:`place_steps` -> the (T,) rows of ``token_rewards`` (each step's score on its last token) and ``turn_ids``
  (the step every token belongs to: a separator counts towards the step after it);
- the step-scorer interface ``scorer(prompt, completion, steps, **columns) -> list[float]`` (one finite float
  per step; :func:`check_scores` says what is wrong with a reply's scores), and two exact rule scorers for the
  built-in tasks (:class:`EquationSteps`: every "a+b=c" in a step checked; :class:`CopySteps`: every step must
  repeat the copy task's digits). A learned process reward model satisfies the same interface.
"""

from __future__ import annotations

import bisect
import importlib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from lmpo.errors import ConfigError
from lmpo.registry import Registry

STEP_SCORERS: Registry = Registry("step_scorer")


@runtime_checkable
class StepScorer(Protocol):
    """One score per step of a reply; ``columns`` are the task row's columns (``answer``, ...)."""

    def __call__(self, prompt: str, completion: str, steps: list[str], **columns: Any) -> list[float]: ...


def split_steps(text: str, separator: str = "\n\n", pattern: str | None = None) -> list[tuple[int, int]]:
    """Character spans of the steps of ``text``: the pieces between separators (``pattern``, a regex, wins over
    ``separator``), without surrounding whitespace; pieces that are only whitespace are dropped."""
    if pattern is not None:
        cuts = [(m.start(), m.end()) for m in re.finditer(pattern, text) if m.end() > m.start()]
    else:
        if not separator:
            raise ConfigError("process credit: the step separator must not be empty (use pattern for a regex).")
        cuts, i = [], text.find(separator)
        while i >= 0:
            cuts.append((i, i + len(separator)))
            i = text.find(separator, i + len(separator))
    bounds = [0] + [x for c in cuts for x in c] + [len(text)]
    spans = []
    for s, e in zip(bounds[::2], bounds[1::2]):
        piece = text[s:e]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((s + lead, s + len(piece.rstrip())))
    return spans


def _prefix_ends(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """End offsets by decoding growing prefixes: a trailing U+FFFD (an incomplete UTF-8 sequence) does not count
    yet, and the ends never decrease."""
    ends, best = [], 0
    for j in range(len(ids)):
        s = tokenizer.decode(list(ids[: j + 1]), skip_special_tokens=True)
        n = len(s.rstrip("\ufffd"))
        best = max(best, n)
        ends.append(best)
    return ends


def token_char_ends(tokenizer: Any, ids: Sequence[int], text: str | None = None) -> list[int]:
    """For each token of ``ids`` (one reply), the end (exclusive) of its characters in ``text`` (default: the reply
    decoded with special tokens skipped). Special tokens end where the token before them ends."""
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=True) if text is None else text
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    plain = [i for i in ids if i not in special]
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        fast = list(enc["input_ids"]) == plain and len(enc["offset_mapping"]) == len(plain)
        # a character split across tokens (byte-level BPE) ends with the token completing it: decode prefixes then
        fast = fast and "\ufffd" not in "".join(tokenizer.convert_ids_to_tokens(plain)) and \
            not any("\ufffd" in tokenizer.decode([i]) for i in plain)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        fast = False
    if fast:
        it = iter(e for _, e in enc["offset_mapping"])
        ends, last = [], 0
        for i in ids:
            if i not in special:
                last = max(last, int(next(it)))
            ends.append(last)
        return ends
    return [min(e, len(text)) for e in _prefix_ends(tokenizer, ids)]


def step_end_tokens(char_ends: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[int]:
    """The index of the token holding each step's last character (the first token whose text ends at or after the
    step's end); a step beyond the last token's text ends on the last token."""
    last = len(char_ends) - 1
    return [min(bisect.bisect_left(list(char_ends), e), last) for _, e in spans]


def place_steps(ends: Sequence[int], scores: Sequence[float], T: int) -> tuple[Tensor, Tensor, int]:
    """(token_rewards (T,), turn_ids (T,) long, merged): score k on token ``ends[k]`` (scores of steps ending on
    the same token add up; ``merged`` counts such collisions); the tokens after step k-1's end up to step k's end
    carry id k (after merging), tokens after the last step's end carry the last id."""
    rewards = torch.zeros(T, dtype=torch.float32)
    turn = torch.zeros(T, dtype=torch.long)
    uniq: list[int] = []
    for e, s in zip(ends, scores):
        rewards[e] += float(s)
        if not uniq or e != uniq[-1]:
            uniq.append(e)
    start = 0
    for k, e in enumerate(uniq):
        turn[start:e + 1] = k
        start = e + 1
    if uniq:
        turn[start:] = len(uniq) - 1
    return rewards, turn, len(ends) - len(uniq)


def check_scores(scores: Any, n: int) -> str:
    """What is wrong with one reply's step scores ("" when they are ``n`` finite numbers)."""
    try:
        vals = [float(x) for x in scores]
    except (TypeError, ValueError):
        return f"expected a list of {n} numbers, got {scores!r}"
    if len(vals) != n:
        return f"expected {n} scores (one per step), got {len(vals)}"
    bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
    return f"step(s) {bad} scored {[vals[i] for i in bad]} (not finite)" if bad else ""


def check_scorer_spec(spec: str, where: str) -> None:
    """Fail at configuration time on an unknown scorer name (``module:attr`` specs are imported when first used)."""
    if ":" not in spec:
        STEP_SCORERS.entry(spec, where=where)


def check_pattern(pattern: str | None, where: str) -> None:
    """Fail at configuration time on a regex that does not compile."""
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{where}={pattern!r} is not a valid regular expression: {e}.") from None


def resolve_scorer(spec: str) -> Callable[..., list[float]]:
    """A step scorer by registered name (:data:`STEP_SCORERS`) or ``module:attribute`` (a class is instantiated)."""
    if ":" in spec:
        mod, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"process credit: scorer {spec!r} cannot be imported ({e}).") from None
    else:
        obj = STEP_SCORERS.get(spec, where="scorer")
    return obj() if isinstance(obj, type) else obj


_EQ = re.compile(r"(\d+(?:\s*[+\-*]\s*\d+)+)\s*=\s*(-?\d+)")


@STEP_SCORERS.register("equation_steps", paper="", arxiv="")
@dataclass(frozen=True)
class EquationSteps:
    """Exact arithmetic checker: a step scores ``correct`` when every "a+b=c" (also - and *) in it holds,
    ``wrong`` when one does not, and ``neutral`` when it holds none."""

    correct: float = 1.0
    wrong: float = -1.0
    neutral: float = 0.0

    def __call__(self, prompt: str, completion: str, steps: list[str], **_: Any) -> list[float]:
        out = []
        for s in steps:
            eqs = _EQ.findall(s)
            if not eqs:
                out.append(self.neutral)
                continue
            ok = all(eval(lhs, {"__builtins__": {}}, {}) == int(rhs) for lhs, rhs in eqs)  # digits and + - * only
            out.append(self.correct if ok else self.wrong)
        return out


@STEP_SCORERS.register("copy_steps", paper="", arxiv="")
@dataclass(frozen=True)
class CopySteps:
    """The copy task's step checker: a step scores ``correct`` when it starts with the digits to copy (the row's
    ``answer``, else the digits before the prompt's last "="), else ``wrong``."""

    correct: float = 1.0
    wrong: float = -1.0

    def __call__(self, prompt: str, completion: str, steps: list[str], answer: Any = None, **_: Any) -> list[float]:
        target = str(answer) if answer is not None else re.findall(r"(\d+)=", prompt)[-1:] or [""]
        target = target if isinstance(target, str) else target[0]
        return [self.correct if target and s.startswith(target) else self.wrong for s in steps]
