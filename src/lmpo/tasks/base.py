"""The :class:`Task` container shared by every task builder.

A task is plain data: train and eval rows (dicts with a ``"prompt"`` plus reward columns such as ``"answer"``), the
default reward functions, and an optional system prompt. Builders registered in :data:`lmpo.registry.TASKS` are
frozen dataclasses whose fields are the task's parameters and whose ``build()`` returns a :class:`Task`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmpo.errors import DataError
from lmpo.rewards.reward_set import RewardSpec


def prompt_problem(prompt: Any) -> str | None:
    """Why ``prompt`` is unusable (``None`` if it is a non-empty string or a non-empty list of chat messages)."""
    if prompt is None:
        return "the prompt is missing (None)"
    if isinstance(prompt, str):
        return None if prompt.strip() else "the prompt is an empty string"
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            return "the prompt is an empty list of messages"
        for m in prompt:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return f"the prompt is a list but {str(m)[:60]!r} is not a chat message {{'role': ..., 'content': ...}}"
        return None
    return f"the prompt is a {type(prompt).__name__}, expected a string or a list of chat messages"


def columns_of(rows: list[dict]) -> dict[str, list]:
    """Reward columns of ``rows``: every key but ``"prompt"``, as lists aligned with the rows (``None`` if absent)."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(k for k in row if k != "prompt"))
    return {k: [row.get(k) for row in rows] for k in keys}


@dataclass
class Task:
    """A prompt set with its default rewards.

    Attributes:
        name: Task name, used in error messages and logs.
        train: Training rows; each has ``"prompt"`` (a string or a list of chat messages) plus reward columns.
        eval: Held-out rows of the same shape (may be empty).
        rewards: The task's default reward functions.
        system_prompt: Optional system message the rollout prepends to every prompt.
    """

    name: str
    train: list[dict]
    eval: list[dict]
    rewards: list[RewardSpec]
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if not self.train:
            raise DataError(f'Task "{self.name}" has an empty train set; it needs at least one prompt row.')
        for split, rows in (("train", self.train), ("eval", self.eval)):
            for i, row in enumerate(rows):
                if not isinstance(row, dict) or "prompt" not in row:
                    raise DataError(
                        f'Task "{self.name}" {split} row {i} (0-based) has no "prompt" key; every row must be a dict '
                        f'with "prompt" plus reward columns. Got: {str(row)[:80]!r}'
                    )
                problem = prompt_problem(row["prompt"])
                if problem:
                    raise DataError(f'Task "{self.name}" {split} row {i} (0-based): {problem}.')

    def columns(self, rows: list[dict]) -> dict[str, list]:
        """The reward columns of ``rows`` (see :func:`columns_of`)."""
        return columns_of(rows)
