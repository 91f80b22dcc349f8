"""Built-in reward functions.

Every reward follows TRL's convention ``fn(prompts=..., completions=..., **columns) -> list[float]``: columns are
lists aligned with the samples (``answer=[...]``) and unknown columns are ignored. Rewards with hyper-parameters are
frozen dataclasses so the registry can list and validate their fields. Heavy dependencies (math-verify pulls in
sympy; reasoning-gym is slow to import) are imported on first use so ``import lmpo`` stays fast.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from lmpo.registry import REWARDS

# A minus sign counts only when it cannot be a binary operator ("3-5" ends in 5, "= -5" ends in -5); thousands
# groups need exactly three digits so "1,2345" is not read as 1,234 followed by 5.
_NUMBER = re.compile(r"(?<![\w)\].])[-\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w)\].])[-\u2212]?\.\d+")


def extract_tag(text: str, tag: str = "answer") -> str | None:
    """Return the stripped content of the last ``<tag>...</tag>`` block in ``text``, or ``None`` if there is none."""
    hits = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return hits[-1].strip() if hits else None


def _to_decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "").replace("\u2212", "-").strip())
    except InvalidOperation:
        return None


def last_number(text: str) -> Decimal | None:
    """The last number written in ``text`` (commas, negatives and decimals understood), or ``None``."""
    hits = _NUMBER.findall(text)
    return _to_decimal(hits[-1]) if hits else None


@REWARDS.register("final_number", paper="", arxiv="")
@dataclass(frozen=True)
class FinalNumber:
    """1.0 if the last number in the completion equals the numeric ``answer`` column (e.g. "... so 1,234." ok)."""

    def __call__(self, prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
        out = []
        for completion, gold in zip(completions, answer):
            want = _to_decimal(str(gold))
            if want is None:
                # A bad gold answer is a data bug, not a wrong completion: surface it instead of scoring 0.
                raise ValueError(f"final_number: the answer column holds {gold!r}, which is not a number")
            got = last_number(completion)
            out.append(1.0 if got is not None and got == want else 0.0)
        return out


@REWARDS.register("exact_match", paper="", arxiv="")
@dataclass(frozen=True)
class ExactMatch:
    """1.0 if the stripped completion (or its ``<answer>`` block, if any) equals the ``answer`` column."""

    case_sensitive: bool = True
    use_answer_tag: bool = True
    tag: str = "answer"

    def __call__(self, prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
        out = []
        for completion, gold in zip(completions, answer):
            got = (extract_tag(completion, self.tag) if self.use_answer_tag else None) or completion.strip()
            want = str(gold).strip()
            if not self.case_sensitive:
                got, want = got.casefold(), want.casefold()
            out.append(1.0 if got == want else 0.0)
        return out


@REWARDS.register("answer_tag_format", paper="", arxiv="")
@dataclass(frozen=True)
class AnswerTagFormat:
    """1.0 if the completion holds exactly one well-formed ``<answer>...</answer>`` block, else 0.0."""

    tag: str = "answer"

    def __call__(self, prompts: list, completions: list[str], **_: Any) -> list[float]:
        open_, close = f"<{self.tag}>", f"</{self.tag}>"
        out = []
        for c in completions:
            ok = c.count(open_) == 1 and c.count(close) == 1 and c.index(open_) < c.index(close)
            out.append(1.0 if ok else 0.0)
        return out


@REWARDS.register("prefix_match", paper="", arxiv="")
@dataclass(frozen=True)
class PrefixMatch:
    """Fraction of the answer reproduced character by character from the completion's start (dense signal)."""

    def __call__(self, prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
        out = []
        for completion, gold in zip(completions, answer):
            gold = str(gold)
            if not gold:
                out.append(1.0)
                continue
            n = 0
            for got, want in zip(completion, gold):
                if got != want:
                    break
                n += 1
            out.append(n / len(gold))
        return out


@REWARDS.register("math_verify", paper="", arxiv="")
@dataclass(frozen=True)
class MathVerify:
    """1.0 if the completion's final answer is mathematically equal to the ``answer`` column (math-verify)."""

    use_answer_tag: bool = True
    tag: str = "answer"
    timeout_seconds: int = 5

    def __call__(self, prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException

        # math-verify times out with SIGALRM, which only works on the main thread; elsewhere run without a timeout.
        timeout = self.timeout_seconds if threading.current_thread() is threading.main_thread() else None

        def parse_first(*candidates: str) -> list:
            for text in candidates:
                parsed = parse(text, parsing_timeout=timeout)
                if parsed:
                    return parsed
            return []

        out = []
        for completion, gold in zip(completions, answer):
            gold = str(gold).strip()
            tagged = extract_tag(completion, self.tag) if self.use_answer_tag else None
            try:
                # Bare LaTeX such as "x^2+1" only parses inside math delimiters, so try the wrapped form too.
                want = parse_first(f"${gold}$", gold) if "$" not in gold else parse_first(gold)
                if tagged is None:  # a bare reply such as "x^2+1" also needs the wrapped attempt
                    got = parse_first(completion, f"${completion}$")
                else:  # an empty <answer></answer> block is a wrong answer, not a cue to search the whole text
                    got = parse_first(tagged, f"${tagged}$") if tagged else []
                ok = bool(want) and bool(got) and verify(want, got, timeout_seconds=timeout)
            except (Exception, TimeoutException):  # noqa: BLE001 - garbage scores 0, never crashes a step
                ok = False
            out.append(1.0 if ok else 0.0)
        return out


RG_COLUMNS = ("rg_dataset", "rg_seed", "rg_size", "rg_config", "rg_index")


@lru_cache(maxsize=32)
def rg_dataset(name: str, seed: int, size: int, config_json: str) -> Any:
    """The reasoning-gym dataset object for these settings (cached: building one can be slow)."""
    import reasoning_gym

    return reasoning_gym.create_dataset(name, seed=seed, size=size, **json.loads(config_json))


@lru_cache(maxsize=8192)
def rg_entry(name: str, seed: int, size: int, config_json: str, index: int) -> dict:
    """Entry ``index`` of a reasoning-gym dataset; entries are regenerated deterministically from the seed."""
    return rg_dataset(name, seed, size, config_json)[index]


@REWARDS.register("reasoning_gym", paper="", arxiv="")
@dataclass(frozen=True)
class ReasoningGymScore:
    """Score with the reasoning-gym dataset's own verifier; the answer is read from ``<answer>`` tags if present."""

    tag: str = "answer"

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        missing = [c for c in RG_COLUMNS if c not in columns]
        if missing:
            raise ValueError(
                f"reasoning_gym reward needs the columns {', '.join(RG_COLUMNS)} (written by the reasoning_gym "
                f"task); missing: {', '.join(missing)}. Got columns: {', '.join(sorted(columns)) or '(none)'}"
            )
        out = []
        for i, completion in enumerate(completions):
            key = tuple(columns[c][i] for c in RG_COLUMNS)
            entry = rg_entry(str(key[0]), int(key[1]), int(key[2]), str(key[3]), int(key[4]))
            extracted = extract_tag(completion, self.tag)
            given = extracted if extracted is not None else completion.strip()
            score = rg_dataset(str(key[0]), int(key[1]), int(key[2]), str(key[3])).score_answer(
                answer=given, entry=entry
            )
            out.append(float(score))
        return out


@REWARDS.register("env_return", paper="", arxiv="")
@dataclass(frozen=True)
class EnvReturn:
    """The episode's return (sum of the environment's per-turn rewards), from the ``env_return`` column that
    ``rollout.mode: episodes`` records (:mod:`lmpo.rollout.episodes`)."""

    def __call__(self, prompts: list, completions: list[str], env_return: list | None = None, **_: Any) -> list[float]:
        if env_return is None or any(r is None for r in env_return):
            raise ValueError("env_return reads the episode returns that rollout.mode: episodes records; set "
                             "rollout.mode: episodes (with an environment in rollout.mode_params.env).")
        return [float(r) for r in env_return]


@REWARDS.register("env_success", paper="", arxiv="")
@dataclass(frozen=True)
class EnvSuccess:
    """1 when the episode's return (the ``env_return`` column of ``rollout.mode: episodes``) reaches ``threshold``,
    else 0: a task-level outcome beside the environment's per-turn rewards (e.g. the high-level reward of G-RA).

    Attributes:
        threshold: The return an episode needs to count as a success.
    """

    threshold: float = 1.0

    def __call__(self, prompts: list, completions: list[str], env_return: list | None = None, **_: Any) -> list[float]:
        returns = EnvReturn()(prompts, completions, env_return=env_return)
        return [1.0 if r >= self.threshold - 1e-9 else 0.0 for r in returns]


# Built-ins that read the "answer" column; tasks use this to reject configs that drop that column.
NEEDS_ANSWER = frozenset({"final_number", "exact_match", "prefix_match", "math_verify"})
