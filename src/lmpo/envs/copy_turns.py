"""``copy_turns``: the tiny multi-turn learning task (the copy task of ``configs/tiny.yaml`` over several turns).

Each turn shows one digit followed by ``=`` (``"3="``); the reply is right when it starts with that digit, and each
right turn is worth ``1 / turns``, so the return (the sum) is the share of turns copied. The digits of an episode
are drawn from its seed, so a group's episodes (one seed) see the same first observation. Only characters of the
tiny test tokenizer appear (digits and ``=``), so the tiny random model of ``configs/tiny-agent.yaml`` learns it in
a few dozen GRPO steps on a CPU.

``on_error`` chooses what the observation after a wrong reply is:

* ``"next"`` (default): the next digit of the seed's sequence regardless, so every episode of a group sees the same
  observation at turn t (the observations do not depend on the actions);
* ``"repeat"``: the same digit again (the turn is retried; the episode still ends after ``turns`` replies), so
  episodes of one group reach different states and the same state can recur within an episode, the case GiGPO's
  anchor-state grouping is built for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmpo.errors import ConfigError
from lmpo.registry import ENVS


@ENVS.register("copy_turns", paper="", arxiv="")
@dataclass
class CopyTurnsEnv:
    """Copy the digit shown, turn after turn; reward 1/turns per right reply (the tiny multi-turn test task).

    Attributes:
        turns: Policy turns per episode (the episode ends after this many replies).
        on_error: ``"next"`` (a wrong reply moves on to the next digit) or ``"repeat"`` (the digit is shown again).
    """

    turns: int = 3
    on_error: str = "next"

    def __post_init__(self) -> None:
        if isinstance(self.turns, bool) or not isinstance(self.turns, int) or self.turns < 1:
            raise ConfigError(f"env copy_turns: turns must be an integer >= 1, got {self.turns!r}.")
        if self.on_error not in ("next", "repeat"):
            raise ConfigError(f'env copy_turns: on_error must be "next" or "repeat", got {self.on_error!r}.')
        self._digits: list[str] = []
        self._t = 0
        self._k = 0

    def reset(self, seed: int | None = None) -> str:
        rng = random.Random(seed)
        self._digits = [rng.choice("0123456789") for _ in range(self.turns)]
        self._t = self._k = 0
        return self._digits[0] + "="

    @property
    def answer(self) -> str:
        """The episode's digits in order (its ground-truth "answer", e.g. for IGPO's information gain: each
        observation reveals one more of them)."""
        return "".join(self._digits)

    @property
    def digit(self) -> str:
        """The digit shown now (to be copied by the next reply)."""
        return self._digits[self._k]

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if not self._digits:
            raise RuntimeError("copy_turns: step() before reset()")
        if self._t >= self.turns:
            raise RuntimeError("copy_turns: step() after the episode ended")
        right = action.strip()[:1] == self.digit
        self._t += 1
        if right or self.on_error == "next":
            self._k = min(self._k + 1, self.turns - 1)
        done = self._t >= self.turns
        obs = "" if done else self.digit + "="
        return obs, (1.0 / self.turns) if right else 0.0, done, {"invalid_action": not action.strip()[:1].isdigit()}
