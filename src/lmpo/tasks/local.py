"""Prompts from a local JSONL, JSON or Parquet file (loaded with ``datasets``)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

from lmpo.errors import ConfigError, DataError, did_you_mean
from lmpo.registry import REWARDS, TASKS
from lmpo.rewards.builtin import NEEDS_ANSWER
from lmpo.rewards.reward_set import RewardSpec
from lmpo.tasks.base import Task, prompt_problem

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _load(path: str, what: str) -> list[dict]:
    """Read every row of ``path`` as a list of dicts, with one clear error for each way it can fail."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMATS:
        raise ConfigError(
            f'{what} "{path}" has the unsupported extension "{ext or "(none)"}"; use one of '
            f"{', '.join(_FORMATS)}.{did_you_mean(ext, _FORMATS) if ext else ''}"
        )
    if not os.path.isfile(path):
        raise DataError(f'{what} "{path}" does not exist (resolved to {os.path.abspath(path)}).')
    # datasets fails on an empty file or "[]" with an opaque StopIteration / "no data"; report it as empty instead.
    if ext != ".parquet" and os.path.getsize(path) < 16:
        with open(path, encoding="utf-8", errors="replace") as f:
            if f.read().strip() in ("", "[]"):
                return []
    import datasets

    try:
        ds = datasets.load_dataset(_FORMATS[ext], data_files=path, split="train")
    except Exception as exc:  # noqa: BLE001 - parse errors come from several layers (arrow, json, datasets)
        bad_line = _first_bad_jsonl_line(path) if ext == ".jsonl" else None
        if bad_line:
            raise DataError(f'{what} "{path}" {bad_line}; every line must be one JSON object (a row).') from None
        cause = exc.__cause__ or exc
        raise DataError(
            f'{what} "{path}" could not be read as {ext[1:]}: {type(cause).__name__}: {str(cause)[:300]}'
        ) from None
    return ds.to_list()


def _first_bad_jsonl_line(path: str) -> str | None:
    """Where a JSONL file breaks ("line 3 is not valid JSON (...): ..."), or ``None`` if every line is an object."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {i} is not valid JSON ({exc.msg} at column {exc.colno}): {line[:80]!r}"
            if not isinstance(row, dict):
                return f"line {i} is a JSON {type(row).__name__}, not an object: {line[:80]!r}"
    return None


@TASKS.register("local", paper="", arxiv="")
@dataclass(frozen=True)
class LocalTask:
    """Prompts (and answers) from a local JSONL / JSON / Parquet file.

    Attributes:
        path: Training file (``.jsonl``, ``.json`` or ``.parquet``).
        eval_path: Optional eval file; without it ``eval_fraction`` of ``path`` is held out.
        eval_fraction: Share of ``path`` held out for eval when ``eval_path`` is not given (0 disables eval).
        prompt_column: Column holding the prompt (a string or a list of chat messages); renamed to "prompt".
        answer_column: Column holding the reference answer, renamed to "answer"; ``None`` if there is none.
        seed: Seed of the train/eval split.
        max_rows: Keep only the first ``max_rows`` rows of each file.
        rewards: Reward names or ``"module:function"`` paths (mappings ``{name, weight, kwargs}`` also work).
    """

    path: str
    eval_path: str | None = None
    eval_fraction: float = 0.1
    prompt_column: str = "prompt"
    answer_column: str | None = "answer"
    seed: int = 0
    max_rows: int | None = None
    rewards: list = field(default_factory=lambda: ["math_verify"])

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"task local: eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"task local: max_rows must be >= 1 or null, got {self.max_rows}.")
        for i, spec in enumerate(self.rewards):
            name = RewardSpec.coerce(spec, where=f"task.rewards[{i}]").name
            if ":" not in name:
                REWARDS.entry(name, where=f"task.rewards[{i}]")  # unknown names fail now, not at the first step
            if self.answer_column is None and name in NEEDS_ANSWER:
                raise ConfigError(
                    f'task local: reward "{name}" compares against the "answer" column, but answer_column is null; '
                    f"set answer_column to the file's answer column or choose a reward that needs no answer."
                )

    def _rows(self, path: str, what: str) -> list[dict]:
        raw = _load(path, what)
        if self.max_rows is not None:
            raw = raw[: self.max_rows]
        if not raw:
            raise DataError(f'{what} "{path}" contains no rows; the task needs at least one prompt.')
        available = list(raw[0])
        for role, col in (("prompt_column", self.prompt_column), ("answer_column", self.answer_column)):
            if col is not None and col not in available:
                raise DataError(
                    f'{what} "{path}" has no column "{col}" (task.{role}).{did_you_mean(col, available)} '
                    f"Available columns: {', '.join(available)}."
                )
        rows = []
        for i, r in enumerate(raw):
            problem = prompt_problem(r[self.prompt_column])
            if problem:
                raise DataError(
                    f'{what} "{path}" row {i} (0-based), column "{self.prompt_column}": {problem}. '
                    f"Every row needs a non-empty prompt; fix or drop that row."
                )
            # The chosen columns win over any other column already called "prompt"/"answer".
            row = {k: v for k, v in r.items() if k not in (self.prompt_column, self.answer_column, "prompt", "answer")}
            row["prompt"] = r[self.prompt_column]
            if self.answer_column is not None:
                row["answer"] = r[self.answer_column]
            rows.append(row)
        return rows

    def build(self) -> Task:
        """Load the file(s) and split train/eval (a seeded random hold-out when there is no ``eval_path``)."""
        rows = self._rows(self.path, "Task file")
        if self.eval_path is not None:
            train, eval_rows = rows, self._rows(self.eval_path, "Eval file")
        else:
            n_eval = round(len(rows) * self.eval_fraction)
            if self.eval_fraction > 0 and len(rows) > 1:
                n_eval = min(max(n_eval, 1), len(rows) - 1)  # keep at least one row on each side
            held = set(random.Random(self.seed).sample(range(len(rows)), n_eval))
            train = [r for i, r in enumerate(rows) if i not in held]
            eval_rows = [r for i, r in enumerate(rows) if i in held]
        return Task(
            name=f"local:{os.path.basename(self.path)}",
            train=train,
            eval=eval_rows,
            rewards=[RewardSpec.coerce(s, where=f"task.rewards[{i}]") for i, s in enumerate(self.rewards)],
        )
