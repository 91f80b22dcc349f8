"""Training data of the scorer stages, in TRL's formats, and two tiny deterministic built-in sets.

- Pairs (``stage: reward_model``), TRL's reward/preference format: ``chosen``, ``rejected``, an optional ``prompt``
  (absent: the prompt is implicit in both texts) and an optional ``margin`` (TRL's RewardTrainer subtracts it inside
  the log-sigmoid). Conversational rows (lists of ``{role, content}``) are accepted: the prompt messages are
  rendered with the scorer's chat template and the reply is the last message's content.
- Steps (``stage: prm``), TRL's stepwise-supervision format: ``prompt``, ``completions`` (a list of steps) and
  ``labels`` (one bool per step).

``scorer.data`` is a file (``.jsonl``, ``.json``, ``.parquet``, read like the ``local`` task's files) or a built-in
set ``{builtin: copy_pairs | arithmetic_pairs | copy_steps | polar_pairs, num: 512, seed: 0, ...}``; only characters the tiny
model's tokenizer knows appear in the built-ins, so a tiny scorer learns them in seconds.

Pair files are read by the preference stage's loader, ``lmpo.tasks.pairs`` (one reader of TRL's format for DPO and
for reward models).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

from lmpo.errors import ConfigError, DataError, did_you_mean

BUILTINS = ("copy_pairs", "arithmetic_pairs", "copy_steps", "polar_pairs", "cappy_rows")


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def _corrupt(rng: random.Random, text: str) -> str:
    """``text`` with one digit replaced by another digit."""
    i = rng.randrange(len(text))
    return text[:i] + rng.choice([d for d in "0123456789" if d != text[i]]) + text[i + 1:]


def copy_pairs(num: int = 512, seed: int = 0, length: int = 1, varied: float = 0.0, flip: float = 0.0) -> list[dict]:
    """Prompt "37=", chosen "37" (the copy task's answer), rejected the answer with one digit changed.

    ``varied``: the fraction of rows whose replies look like a sampling policy's rather than the answer alone: both
    sides get a random tail of 0-3 characters (the copy task's ``prefix_match`` ignores what follows the answer),
    and a third of those rows reject an empty reply. Without it an RM never sees such replies, and RL finds them
    (docs/reward-models.md, the measured flow). ``flip``: the fraction of rows whose sides are swapped (label
    noise, as in the CRM and RM-ensemble papers' noisy settings)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        d = _digits(rng, length)
        chosen, rejected = d, _corrupt(rng, d)
        if rng.random() < varied:
            tail = lambda: "".join(rng.choice("0123456789+= ") for _ in range(rng.randint(0, 3)))  # noqa: E731
            chosen, rejected = chosen + tail(), rejected + tail()
            if rng.random() < 1 / 3:
                rejected = ""
        if flip and rng.random() < flip:
            chosen, rejected = rejected, chosen
        rows.append({"prompt": d + "=", "chosen": chosen, "rejected": rejected})
    return rows


def arithmetic_pairs(num: int = 512, seed: int = 0, max_value: int = 9) -> list[dict]:
    """Prompt "3+4=", chosen the sum, rejected a wrong sum (off by 1..9, never negative)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        a, b = rng.randint(0, max_value), rng.randint(0, max_value)
        wrong = a + b + rng.choice([d for d in range(-9, 10) if d and a + b + d >= 0])
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong)})
    return rows


def copy_steps(num: int = 512, seed: int = 0, length: int = 3, separator: str = " ") -> list[dict]:
    """Prompt "372=", steps the digits one by one ("3", "7", "2"); in half the rows one step is a wrong digit and it
    and every later step are labelled False (Math-Shepherd's convention: a step after an error is not correct)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        d = _digits(rng, length)
        steps, labels = list(d), [True] * length
        if rng.random() < 0.5:
            k = rng.randrange(length)
            steps[k] = _corrupt(rng, steps[k])
            labels[k:] = [False] * (length - k)
        rows.append({"prompt": d + "=", "completions": steps, "labels": labels})
    return rows


def _cappy_rows(**kw):
    from lmpo.rewards.cappy import cappy_rows

    return cappy_rows(**kw)


def _polar_pairs(**kw):
    from lmpo.rewards.polar import polar_pairs

    return polar_pairs(**kw)


_BUILDERS = {"copy_pairs": copy_pairs, "arithmetic_pairs": arithmetic_pairs, "copy_steps": copy_steps,
             "polar_pairs": _polar_pairs, "cappy_rows": _cappy_rows}


def read_rows(spec: Any, where: str) -> list[dict]:
    """The rows of a data spec (a path or ``{builtin: name, ...}``)."""
    if isinstance(spec, dict):
        kw = dict(spec)
        name = kw.pop("builtin", None)
        if name not in _BUILDERS:
            raise ConfigError(f"{where}: builtin {name!r} is not a built-in scorer data set.{did_you_mean(str(name), BUILTINS)} "
                              f"Valid: {', '.join(BUILTINS)}; or give a .jsonl/.json/.parquet path.")
        try:
            return _BUILDERS[name](**kw)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{where} must be a data file path or {{builtin: {BUILTINS[0]}}}, got {spec!r}.")
    from lmpo.tasks.local import _load

    return _load(spec, where)


def _text(value: Any, tok, role_prompt: bool) -> str:
    if isinstance(value, list):  # conversational: a list of {role, content}
        if role_prompt:
            from lmpo.models.load import format_prompt

            return format_prompt(tok, value)
        return str(value[-1].get("content", "")) if value else ""
    return "" if value is None else str(value)


def load_pairs(spec: Any, tok, where: str = "scorer.data") -> tuple[list[dict], dict[str, int]]:
    """Rows ``{prompt, chosen, rejected, margin}`` (strings, float) and counts of what was skipped.

    A file is read by the preference stage's loader (:func:`lmpo.tasks.pairs.load_pairs`: TRL's format, plain or
    conversational, implicit prompts; a missing column is an error naming the row; empty or identical sides are
    skipped and counted); a built-in set is used as generated (a built-in may reject an *empty* reply: a real
    negative, since a policy can stop at once). Prompts are rendered as the rollouts render them."""
    from lmpo.models.load import format_prompt
    from lmpo.tasks.pairs import load_pairs as read_pair_file, response_text

    counts: Counter = Counter()
    if isinstance(spec, str):
        raw = read_pair_file(spec, skipped=counts, what=where)
    else:
        raw = [dict(r, row=i) for i, r in enumerate(read_rows(spec, where))]
    rows = []
    for r in raw:
        if r.get("unpaired"):
            raise DataError(f"{where}: row {r['row']} is an unpaired example (prompt, completion, label); a Bradley-"
                            "Terry reward model needs pairs. Train on it with scorer.objective: pointwise.")
        prompt = r.get("prompt")
        text = format_prompt(tok, prompt) if isinstance(prompt, list) else "" if prompt is None else str(prompt)
        chosen, rejected = (response_text(tok, prompt, r[k]) if isinstance(r[k], list) else str(r[k])
                            for k in ("chosen", "rejected"))
        if not chosen.strip() or chosen == rejected:
            counts["empty_side" if not chosen.strip() else "identical"] += 1
            continue
        try:
            margin = float(r.get("margin") or 0.0)
        except (TypeError, ValueError):
            raise DataError(f"{where}: row {r['row']} has margin {r.get('margin')!r}, not a number.") from None
        rows.append({"prompt": text, "chosen": chosen, "rejected": rejected, "margin": margin})
    if not rows:
        raise DataError(f"{where}: no usable pair (skipped: {dict(counts)}).")
    return rows, dict(counts)


def load_pointwise(spec: Any, tok, where: str = "scorer.data") -> tuple[list[dict], dict[str, int]]:
    """Rows ``{prompt, completion, label}`` with a label in [0, 1] (TRL's unpaired format: a bool label; Cappy's
    soft labels: a float), checked row by row."""
    rows, skipped = [], {"empty": 0}
    for i, r in enumerate(read_rows(spec, where)):
        missing = [c for c in ("completion", "label") if r.get(c) is None]
        if missing:
            raise DataError(f"{where}: row {i} has no {', '.join(missing)} column (pointwise rows: prompt, completion, "
                            f"label in [0, 1]); its columns: {', '.join(sorted(r))}.")
        try:
            label = float(r["label"])
        except (TypeError, ValueError):
            label = math.nan
        if not 0.0 <= label <= 1.0:
            raise DataError(f"{where}: row {i} has label {r['label']!r}; a pointwise label is a number in [0, 1].")
        completion = _text(r["completion"], tok, False)
        if not completion.strip():
            skipped["empty"] += 1
            continue
        rows.append({"prompt": _text(r.get("prompt"), tok, True), "completion": completion, "label": label})
    if not rows:
        raise DataError(f"{where}: no usable row (skipped: {skipped}).")
    return rows, skipped


def load_steps(spec: Any, tok, where: str = "scorer.data") -> tuple[list[dict], dict[str, int]]:
    """Rows ``{prompt, completions: [str], labels: [bool]}`` (TRL's stepwise format), checked row by row."""
    rows, skipped = [], {"empty": 0}
    for i, r in enumerate(read_rows(spec, where)):
        missing = [c for c in ("completions", "labels") if r.get(c) is None]
        if missing:
            raise DataError(f"{where}: row {i} has no {', '.join(missing)} column (TRL's stepwise format: prompt, "
                            f"completions (list of steps), labels (list of bools)); its columns: {', '.join(sorted(r))}.")
        steps, labels = r["completions"], r["labels"]
        if not isinstance(steps, list) or not isinstance(labels, list) or len(steps) != len(labels):
            raise DataError(f"{where}: row {i}: completions and labels must be lists of the same length, got "
                            f"{len(steps) if isinstance(steps, list) else steps!r} steps and "
                            f"{len(labels) if isinstance(labels, list) else labels!r} labels.")
        if not steps:
            skipped["empty"] += 1
            continue
        if any(not isinstance(x, (bool, int)) for x in labels):
            raise DataError(f"{where}: row {i}: labels must be booleans, got {labels!r}.")
        rows.append({"prompt": _text(r.get("prompt"), tok, True), "completions": [str(s) for s in steps],
                     "labels": [bool(x) for x in labels]})
    if not rows:
        raise DataError(f"{where}: no usable row (skipped: {skipped}).")
    return rows, skipped
