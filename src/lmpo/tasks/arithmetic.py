"""Seeded two-operand arithmetic ("What is 37 + 85?"), scored by the last number in the reply."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from lmpo.errors import ConfigError
from lmpo.registry import TASKS
from lmpo.rewards.reward_set import RewardSpec
from lmpo.tasks.base import Task

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@TASKS.register("arithmetic", paper="", arxiv="")
@dataclass(frozen=True)
class ArithmeticTask:
    """Seeded two-operand arithmetic problems; train and eval never share an (a, op, b) triple.

    Attributes:
        seed: Seed of the problem sampler; the same seed gives the same rows.
        num_train: Number of training problems.
        num_eval: Number of held-out problems.
        min_value: Smallest operand (inclusive).
        max_value: Largest operand (inclusive).
        ops: Operators to draw from, any of "+", "-", "*" (e.g. "+-").
        template: Prompt format with ``{a}``, ``{b}`` and optionally ``{op}``.
        system_prompt: Optional system message.
    """

    seed: int = 0
    num_train: int = 2000
    num_eval: int = 128
    min_value: int = 10
    max_value: int = 99
    ops: str = "+"
    template: str = "What is {a} {op} {b}?"
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        where = "task arithmetic"
        bad = [c for c in self.ops if c not in _OPS]
        if not self.ops or bad:
            raise ConfigError(f'{where}: ops="{self.ops}" must be a non-empty combination of "+", "-", "*".')
        if self.min_value > self.max_value:
            raise ConfigError(f"{where}: min_value={self.min_value} is larger than max_value={self.max_value}.")
        if self.num_train < 0 or self.num_eval < 0:
            raise ConfigError(f"{where}: num_train and num_eval must be >= 0, got {self.num_train}, {self.num_eval}.")
        fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        unknown = fields - {"a", "b", "op"}
        if unknown or not {"a", "b"} <= fields:
            raise ConfigError(
                f'{where}: template "{self.template}" must contain {{a}} and {{b}} (and may contain {{op}}); '
                f"unknown placeholders: {', '.join(sorted(unknown)) or '(none)'}."
            )
        total = self.num_problems
        if self.num_train + self.num_eval > total:
            raise ConfigError(
                f"{where}: num_train + num_eval = {self.num_train + self.num_eval} but only {total} distinct "
                f'problems exist for operands {self.min_value}..{self.max_value} and ops "{self.ops}"; widen the '
                f"range or ask for fewer problems."
            )

    @property
    def num_problems(self) -> int:
        """How many distinct (a, op, b) problems the settings allow."""
        n = self.max_value - self.min_value + 1
        return n * n * len(dict.fromkeys(self.ops))

    def row(self, a: int, op: str, b: int) -> dict:
        """The row for one problem: prompt, answer (a string), operands and operator."""
        prompt = self.template.format(a=a, op=op, b=b)
        return {"prompt": prompt, "answer": str(_OPS[op](a, b)), "a": a, "b": b, "op": op}

    def build(self) -> Task:
        """Sample ``num_train + num_eval`` distinct problems; the first ``num_eval`` become the eval split."""
        ops = list(dict.fromkeys(self.ops))
        n = self.max_value - self.min_value + 1
        # Sampling indices without replacement guarantees disjoint splits; random.sample on a range never
        # materialises it, so huge operand ranges cost nothing.
        picks = random.Random(self.seed).sample(range(self.num_problems), self.num_train + self.num_eval)
        rows = []
        for idx in picks:
            op_i, rest = divmod(idx, n * n)
            a, b = divmod(rest, n)
            rows.append(self.row(a + self.min_value, ops[op_i], b + self.min_value))
        return Task(
            name="arithmetic",
            train=rows[self.num_eval :],
            eval=rows[: self.num_eval],
            rewards=[RewardSpec("final_number")],
            system_prompt=self.system_prompt,
        )
