"""A resumable, seeded stream of prompt rows: reshuffled every epoch, position saved in checkpoints."""

from __future__ import annotations

from typing import Any

import torch

from lmpo.errors import DataError


class PromptStream:
    """Yields rows in a seeded permutation per epoch; ``state_dict()`` records (epoch, position)."""

    def __init__(self, rows: list[dict[str, Any]], seed: int):
        if not rows:
            raise DataError("The training set is empty: there are no prompts to train on.")
        self.rows = rows
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._permutation()
            out.append(self.rows[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation()
