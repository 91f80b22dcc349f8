"""``guided_copy``: a copy task plain GRPO cannot start on, with the columns guidance methods read (docs/guidance.md).

The prompt is ``length`` random digits and "=", the reward is an exact match of the whole reply (digits, then EOS):
a random tiny model (16 tokens) writes a 2-digit answer about once in 16^3 = 4096 samples, so nearly every group is
all-zero and GRPO's advantage vanishes. Each row also carries a reference solution for guidance:

- ``solution``: the answer (RL-PLUS's external trace, ICPO's demonstrations);
- ``teacher_solutions``: a list of teacher solutions (AMPO's pool): the answer, and with ``wrong_teachers`` also that
  many wrong traces (other digit strings), so the comprehension score has something to rank;
- ``hints``: Scaf-GRPO's ladder, the answer revealed digit by digit (solution tier only).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmpo.errors import ConfigError
from lmpo.registry import TASKS
from lmpo.rewards.reward_set import RewardSpec
from lmpo.tasks.base import Task


@TASKS.register("guided_copy", paper="", arxiv="")
@dataclass(frozen=True)
class GuidedCopyTask:
    """Copy ``length`` digits exactly; rows carry ``solution``, ``teacher_solutions`` and ``hints``.

    Attributes:
        seed: Seed of the digit sampler.
        num_train / num_eval: Number of training / held-out prompts (held-out strings never appear in training).
        length: Digits to copy (2 makes random success ~1/4096 per sample on the tiny model).
        wrong_teachers: Wrong traces added to ``teacher_solutions`` after the correct one.
    """

    seed: int = 0
    num_train: int = 64
    num_eval: int = 32
    length: int = 2
    wrong_teachers: int = 1

    def __post_init__(self) -> None:
        where = "task guided_copy"
        if self.length < 1:
            raise ConfigError(f"{where}: length must be >= 1, got {self.length}.")
        if self.num_train < 1 or self.num_eval < 0:
            raise ConfigError(f"{where}: num_train must be >= 1 and num_eval >= 0, got {self.num_train}, {self.num_eval}.")
        if self.num_train + self.num_eval > 10 ** self.length:
            raise ConfigError(f"{where}: num_train + num_eval = {self.num_train + self.num_eval} exceeds the "
                              f"{10 ** self.length} distinct {self.length}-digit strings; lower them or raise length.")
        if self.wrong_teachers < 0:
            raise ConfigError(f"{where}: wrong_teachers must be >= 0, got {self.wrong_teachers}.")

    def build(self) -> Task:
        rng = random.Random(self.seed)
        picks = rng.sample(range(10 ** self.length), self.num_train + self.num_eval)
        rows = []
        for n in picks:
            digits = str(n).zfill(self.length)
            wrong = [str((n + 1 + k) % 10 ** self.length).zfill(self.length) for k in range(self.wrong_teachers)]
            rows.append({"prompt": digits + "=", "answer": digits, "solution": digits,
                         "teacher_solutions": [digits, *wrong],
                         "hints": [digits[:i] for i in range(1, len(digits) + 1)]})
        return Task(name="guided_copy", train=rows[self.num_eval:], eval=rows[: self.num_eval],
                    rewards=[RewardSpec("exact_match")])
