"""The ``env`` task: rows that name environment episodes, for ``rollout.mode: episodes`` (:mod:`lmpo.rollout.episodes`).

Each row is ``{"prompt": instructions, "env_seed": k}``: the multi-turn rollout resets its environment with seed
``k`` and shows the instructions before the first observation. Training rows use seeds ``seed, seed + 1, ...``;
evaluation rows the next ``num_eval`` seeds, so held-out episodes start from states not trained on (with an
environment whose start depends on the seed, e.g. ``frozenlake`` with ``random_map: true``). The reward is the
episode's return (``env_return``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmpo.errors import ConfigError
from lmpo.registry import TASKS
from lmpo.rewards.reward_set import RewardSpec
from lmpo.tasks.base import Task


@TASKS.register("env", paper="", arxiv="")
@dataclass(frozen=True)
class EnvTask:
    """Episode seeds of a text environment (the environment itself is ``rollout.mode_params.env``).

    Attributes:
        num_train: Number of training seeds.
        num_eval: Number of held-out seeds (after the training ones).
        seed: The first training seed.
        instructions: Text shown before the first observation (the environment's own description follows).
        system_prompt: Optional system message (the row's ``system_prompt``; the environment's own one wins).
    """

    num_train: int = 256
    num_eval: int = 16
    seed: int = 0
    instructions: str = "Play the game below. Answer each turn with your next move."
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_eval < 0:
            raise ConfigError(f"task env: num_train must be >= 1 and num_eval >= 0, got {self.num_train}, "
                              f"{self.num_eval}.")
        if not self.instructions.strip():
            raise ConfigError("task env: instructions must not be empty.")

    def build(self) -> Task:
        extra = {"system_prompt": self.system_prompt} if self.system_prompt else {}

        def row(k: int) -> dict:
            return {"prompt": self.instructions, "env_seed": k, **extra}

        train = [row(self.seed + i) for i in range(self.num_train)]
        held = [row(self.seed + self.num_train + i) for i in range(self.num_eval)]
        return Task(name="env", train=train, eval=held, rewards=[RewardSpec("env_return")])
