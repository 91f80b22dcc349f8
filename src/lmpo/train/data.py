"""A resumable, seeded stream of prompt rows: reshuffled every epoch, position saved in checkpoints.

Prompt identity: :func:`prompt_key` names a row (its ``"id"`` column if present, else its prompt), so per-prompt
state (value trackers, success-rate memories) survives reshuffles and refills. ``take(n, weights=...)`` draws a
prioritised batch instead of the next rows of the permutation (prioritised prompt sampling).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import torch

from lmpo.errors import DataError


def prompt_key(row: dict[str, Any]) -> str:
    """Stable identity of a prompt row: ``str(row["id"])`` when the row has an id, else the prompt itself."""
    if row.get("id") is not None:
        return str(row["id"])
    p = row["prompt"]
    return p if isinstance(p, str) else json.dumps(p, sort_keys=True)


class PromptStream:
    """Yields rows in a seeded permutation per epoch; ``state_dict()`` records (epoch, position, weighted draws)."""

    def __init__(self, rows: list[dict[str, Any]], seed: int):
        if not rows:
            raise DataError("The training set is empty: there are no prompts to train on.")
        self.rows = rows
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self.draws = 0  # prioritised draws so far (each uses its own seeded generator, so resuming is exact)
        self._keys: list[str] | None = None
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = [prompt_key(r) for r in self.rows]
        return self._keys

    def take(self, n: int, weights: Callable[[list[str]], Sequence[float]] | None = None) -> list[dict[str, Any]]:
        """The next ``n`` rows; with ``weights`` (prompt keys -> non-negative weights, or None = no preference),
        ``n`` rows drawn with probability proportional to their weight, without replacement (with replacement if
        ``n`` exceeds the rows of positive weight)."""
        w = weights(self.keys) if weights is not None else None
        if w is not None:
            return self._take_weighted(n, w)
        out = []
        for _ in range(n):
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._permutation()
            out.append(self.rows[self._order[self.pos]])
            self.pos += 1
        return out

    def _take_weighted(self, n: int, weights: Sequence[float]) -> list[dict[str, Any]]:
        w = torch.as_tensor(list(weights), dtype=torch.float64)
        if w.shape != (len(self.rows),) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise DataError(f"Prompt weights must be {len(self.rows)} finite non-negative numbers with a positive sum.")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * (self.draws + 1))
        self.draws += 1
        idx = torch.multinomial(w, n, replacement=n > int((w > 0).sum()), generator=g)
        return [self.rows[i] for i in idx.tolist()]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "draws": self.draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.draws = int(state.get("draws", 0))
        self._order = self._permutation()
