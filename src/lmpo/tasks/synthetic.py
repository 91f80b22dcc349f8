"""Synthetic tasks for tests with the tiny character-level model (vocabulary: digits, "+", "=", space)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmpo.errors import ConfigError
from lmpo.registry import TASKS
from lmpo.rewards.reward_set import RewardSpec
from lmpo.tasks.base import Task


@TASKS.register("copy", paper="", arxiv="")
@dataclass(frozen=True)
class CopyTask:
    """Copy ``length`` random digits written before "=" (prompt "37=", answer "37"); scored by prefix match.

    Attributes:
        seed: Seed of the digit sampler.
        num_train: Number of training prompts.
        num_eval: Number of eval prompts (drawn after the train ones from the same stream, so they may repeat
            train prompts when few digit strings exist, e.g. 10 for ``length=1``).
        length: Number of digits to copy.
    """

    seed: int = 0
    num_train: int = 512
    num_eval: int = 64
    length: int = 1

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ConfigError(f"task copy: length must be >= 1, got {self.length}.")
        if self.num_train < 0 or self.num_eval < 0:
            raise ConfigError(f"task copy: num_train and num_eval must be >= 0, got {self.num_train}, {self.num_eval}.")

    def build(self) -> Task:
        """Generate the rows; only characters the tiny tokenizer knows ("0"-"9", "=") appear."""
        rng = random.Random(self.seed)

        def row() -> dict:
            digits = "".join(rng.choice("0123456789") for _ in range(self.length))
            return {"prompt": digits + "=", "answer": digits}

        train = [row() for _ in range(self.num_train)]
        eval_rows = [row() for _ in range(self.num_eval)]
        return Task(name="copy", train=train, eval=eval_rows, rewards=[RewardSpec("prefix_match")])
