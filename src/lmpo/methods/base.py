"""The contract of each component kind.

Every component is a frozen dataclass (hyper-parameters are its fields) with a ``__call__`` of the kind's signature
and a class attribute ``needs``: the optional :class:`~lmpo.batch.RolloutBatch` fields it reads (the training loop
computes ``old_logprobs`` / ``ref_logprobs`` / ``entropy`` only when some component needs them). The trainer never
branches on a component's name.

- Shaper      ``(batch) -> batch``                 rewrites rewards / masks (e.g. overlong penalty).
- Selector    ``(batch) -> (B,) bool``             rows to keep (e.g. DAPO dynamic sampling).
- AdvantageFn ``(batch) -> (B, T)``                per-token advantages, 0 on masked tokens.
- PolicyLoss  ``(logprobs (B, T), batch) -> LossOut``  per-token surrogate loss (to be minimised).
- Aggregator  ``(per_token, mask, normaliser) -> scalar`` and ``normaliser(mask, horizon) -> scalar``; the
  normaliser is computed once on the *global* batch so micro-batching never changes the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from torch import Tensor

from lmpo.batch import RolloutBatch


@dataclass
class LossOut:
    """A policy loss's output: per-token loss (B, T) and detached scalar metrics keyed ``loss/*``."""

    per_token: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Shaper(Protocol):
    needs: ClassVar[frozenset[str]]

    def __call__(self, batch: RolloutBatch) -> RolloutBatch: ...


class Selector(Protocol):
    needs: ClassVar[frozenset[str]]

    def __call__(self, batch: RolloutBatch) -> Tensor: ...


class AdvantageFn(Protocol):
    needs: ClassVar[frozenset[str]]

    def __call__(self, batch: RolloutBatch) -> Tensor: ...


class PolicyLoss(Protocol):
    needs: ClassVar[frozenset[str]]

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut: ...


class Aggregator(Protocol):
    def normaliser(self, mask: Tensor, horizon: int) -> Tensor: ...

    def __call__(self, per_token: Tensor, mask: Tensor, normaliser: Tensor) -> Tensor: ...


NO_NEEDS: frozenset[str] = frozenset()
from lmpo.methods.params import Rule, hp, ordered, rule  # noqa: E402,F401  (declared hyper-parameter ranges)
