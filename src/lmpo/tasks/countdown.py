"""Countdown: reach a target from given numbers with + - * /, each number used once, one equation per step.

A solution is a sequence of equations ``a op b = c`` (``"3+5=8 8*2=16"``): each consumes two numbers of the current
pool (the given numbers plus earlier results) and adds its result. The checker is exact and never evaluates text:
a regular expression reads the equations, integer arithmetic checks them. Rules (those of the TV game): every
intermediate result is a positive integer (``a - b > 0``, ``a / b`` exact), each number is used at most once, and the
puzzle is solved when a correct equation produces the target. Text between equations is ignored; the first wrong
equation (a number not in the pool, a false result, a negative or fractional result) ends the check.

Generation is deterministic in the seed: draw ``num_count`` numbers in ``[min_value, max_value]``, combine
``steps`` of them in random order with random allowed operators (``steps`` = the depth of the planted solution, the
difficulty knob with ``num_count``, ``ops`` and the value range); the last result is the target (never one of the
given numbers, at most ``max_target``). With ``ops="+"`` and the default tiny template only the tiny tokenizer's
characters appear (digits, ``+``, ``=``, space), so the tiny model can play it. The multi-step environment is
:mod:`lmpo.envs.countdown`; the tree search over it is :mod:`lmpo.search`.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Any, NamedTuple

from lmpo.errors import ConfigError
from lmpo.registry import REWARDS, TASKS
from lmpo.rewards.reward_set import RewardSpec
from lmpo.tasks.base import Task

OPS = "+-*/"
_EQUATION = re.compile(r"(\d{1,9})\s*([-+*/\u00d7\u00f7])\s*(\d{1,9})\s*=\s*(-?\d{1,12})")
_CANON = {"\u00d7": "*", "\u00f7": "/"}


class Equation(NamedTuple):
    a: int
    op: str
    b: int
    c: int

    def __str__(self) -> str:
        return f"{self.a}{self.op}{self.b}={self.c}"


def parse_equations(text: str) -> list[Equation]:
    """Every equation ``a op b = c`` in ``text``, in order (non-negative integer operands; × and ÷ accepted)."""
    return [Equation(int(a), _CANON.get(op, op), int(b), int(c)) for a, op, b, c in _EQUATION.findall(text)]


def combine(a: int, op: str, b: int) -> int | None:
    """``a op b`` under Countdown's rules, or ``None`` when the result is not a positive integer."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b if a * b > 0 else None
    if op == "-":
        return a - b if a > b else None
    if op == "/":
        return a // b if b and a % b == 0 and a // b > 0 else None
    raise ValueError(f"unknown operator {op!r}; expected one of {OPS}")


def apply_equation(pool: tuple[int, ...], eq: Equation, ops: str = OPS) -> tuple[tuple[int, ...], str | None]:
    """The pool after ``eq`` (sorted), or the unchanged pool and why ``eq`` is not a legal move."""
    if eq.op not in ops:
        return pool, f"operator {eq.op} is not allowed (allowed: {ops})"
    rest = list(pool)
    for x in (eq.a, eq.b):
        if x not in rest:
            return pool, f"{x} is not available (numbers left: {' '.join(map(str, pool))})"
        rest.remove(x)
    value = combine(eq.a, eq.op, eq.b)
    if value is None:
        return pool, f"{eq.a}{eq.op}{eq.b} is not a positive integer"
    if value != eq.c:
        return pool, f"{eq.a}{eq.op}{eq.b} is {value}, not {eq.c}"
    return tuple(sorted([*rest, value])), None


@dataclass(frozen=True)
class Verdict:
    """The checker's result: ``solved``, how many equations were legal before the first illegal one (or the
    target), the pool then, and the first error (``None`` if none)."""

    solved: bool
    valid_steps: int
    pool: tuple[int, ...]
    error: str | None = None


def check_solution(numbers: list[int], target: int, text: str, ops: str = OPS) -> Verdict:
    """Check ``text`` as a Countdown solution for ``numbers`` -> ``target`` (module docstring for the rules)."""
    pool = tuple(sorted(int(x) for x in numbers))
    eqs = parse_equations(text)
    if not eqs:
        return Verdict(False, 0, pool, "no equation of the form a+b=c found")
    for i, eq in enumerate(eqs):
        pool, error = apply_equation(pool, eq, ops)
        if error:
            return Verdict(False, i, pool, f"equation {i + 1} ({eq}): {error}")
        if eq.c == target:
            return Verdict(True, i + 1, pool)
    return Verdict(False, len(eqs), pool, f"the target {target} was not reached")


def generate_puzzle(rng: random.Random, *, num_count: int, steps: int, min_value: int, max_value: int, ops: str,
                    max_target: int, tries: int = 1000) -> dict[str, Any]:
    """One puzzle from ``rng``: ``{"numbers", "target", "solution"}`` (the planted solution's equations)."""
    for _ in range(tries):
        numbers = [rng.randint(min_value, max_value) for _ in range(num_count)]
        pool, eqs = list(numbers), []
        for _ in range(steps):
            i, j = rng.sample(range(len(pool)), 2)
            a, b = pool[i], pool[j]
            legal = [(op, v) for op in ops if (v := combine(a, op, b)) is not None and v <= max_target]
            if not legal:
                break
            op, v = rng.choice(legal)
            eqs.append(Equation(a, op, b, v))
            pool = [x for k, x in enumerate(pool) if k not in (i, j)] + [v]
        else:
            target = eqs[-1].c
            if target not in numbers and all(e.c != target for e in eqs[:-1]):
                return {"numbers": numbers, "target": target, "solution": " ".join(map(str, eqs))}
    raise ConfigError(f"countdown: no puzzle found in {tries} tries with num_count={num_count}, steps={steps}, "
                      f"values {min_value}..{max_value}, ops {ops!r}, max_target={max_target}; widen the ranges.")


@dataclass(frozen=True)
class CountdownSpec:
    """The difficulty knobs shared by the task and the environment (validated once, errors name the key)."""

    num_count: int = 4
    steps: int = 3
    min_value: int = 1
    max_value: int = 13
    ops: str = OPS
    max_target: int = 100

    def validate(self, where: str) -> None:
        if self.num_count < 2:
            raise ConfigError(f"{where}: num_count must be >= 2, got {self.num_count}.")
        if not 1 <= self.steps <= self.num_count - 1:
            raise ConfigError(f"{where}: steps must be in 1..num_count-1 = 1..{self.num_count - 1}, got {self.steps}.")
        if not 1 <= self.min_value <= self.max_value:
            raise ConfigError(f"{where}: need 1 <= min_value <= max_value, got {self.min_value}, {self.max_value}.")
        bad = sorted(set(self.ops) - set(OPS))
        if not self.ops or bad:
            raise ConfigError(f'{where}: ops="{self.ops}" must be a non-empty combination of "+", "-", "*", "/".')
        if self.max_target < 2:
            raise ConfigError(f"{where}: max_target must be >= 2, got {self.max_target}.")

    def puzzle(self, seed: int) -> dict[str, Any]:
        keys = ("num_count", "steps", "min_value", "max_value", "ops", "max_target")
        return generate_puzzle(random.Random(seed), **{k: getattr(self, k) for k in keys})


def render(template: str, numbers: list[int], target: int, ops: str) -> str:
    return template.format(numbers=" ".join(map(str, numbers)), target=target, ops=" ".join(ops))


@TASKS.register("countdown", paper="", arxiv="")
@dataclass(frozen=True)
class CountdownTask(CountdownSpec):
    """Seeded Countdown puzzles scored by the exact checker (reward ``countdown``); knobs in :class:`CountdownSpec`.

    Attributes:
        seed: Puzzle ``i`` of the train split is drawn from seed ``seed * 1_000_003 + i`` (eval: after the train).
        num_train / num_eval: Split sizes.
        template: Prompt with ``{numbers}``, ``{target}`` and optionally ``{ops}``.
        system_prompt: Optional system message.
    """

    seed: int = 0
    num_train: int = 512
    num_eval: int = 64
    template: str = ("Use the numbers {numbers} to make {target} with {ops}, each number at most once. Write one "
                     "equation per line, like 3+5=8.\n")
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        self.validate("task countdown")
        if self.num_train < 1 or self.num_eval < 0:
            raise ConfigError(f"task countdown: need num_train >= 1 and num_eval >= 0, got {self.num_train}, "
                              f"{self.num_eval}.")
        fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        if not {"numbers", "target"} <= fields or fields - {"numbers", "target", "ops"}:
            raise ConfigError(f'task countdown: template "{self.template}" must contain {{numbers}} and {{target}} '
                              f"(and may contain {{ops}}); unknown: {sorted(fields - {'numbers', 'target', 'ops'})}.")

    def row(self, k: int) -> dict[str, Any]:
        p = self.puzzle(self.seed * 1_000_003 + k)
        return {"prompt": render(self.template, p["numbers"], p["target"], self.ops), "numbers": p["numbers"],
                "target": p["target"], "answer": p["solution"], "puzzle_seed": self.seed * 1_000_003 + k}

    def build(self) -> Task:
        rows = [self.row(k) for k in range(self.num_train + self.num_eval)]
        return Task(name="countdown", train=rows[: self.num_train], eval=rows[self.num_train :],
                    rewards=[RewardSpec("countdown", kwargs={"ops": self.ops})], system_prompt=self.system_prompt)


@REWARDS.register("countdown", paper="", arxiv="")
@dataclass(frozen=True)
class CountdownReward:
    """1.0 when the completion solves the row's Countdown puzzle (exact checker), else ``partial`` times the share of
    the planted solution's steps made legally before the first error (0 by default: a binary reward).

    Attributes:
        ops: Allowed operators.
        partial: Credit per legal step (as a share of the steps needed), for shaped variants.
    """

    ops: str = OPS
    partial: float = 0.0

    def __call__(self, prompts: list, completions: list[str], numbers: list | None = None,
                 target: list | None = None, **_: Any) -> list[float]:
        if numbers is None or target is None:
            raise ValueError("countdown reads the 'numbers' and 'target' columns of a countdown task row; use "
                             "task: {name: countdown} or give both columns in your data.")
        out = []
        for text, nums, tgt in zip(completions, numbers, target):
            v = check_solution(list(nums), int(tgt), text, self.ops)
            need = max(1, len(nums) - 1)
            out.append(1.0 if v.solved else self.partial * min(v.valid_steps, need) / need)
        return out
