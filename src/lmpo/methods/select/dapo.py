"""DAPO's rollout selection and length shaping.

Paper: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476.
- Dynamic sampling (Sec. 3.2, Eq. 11 constraint 0 < |{o_i : correct}| < G): drop groups whose task rewards are
  all equal (all correct or all wrong), since their GRPO advantages would be zero but for the length penalty; the
  loop refills with new prompts (``rollout.refill_rounds``). The condition is on correctness, i.e. the rewards
  *before* shaping (``reward_components``), not on the reward after the overlong penalty: judged after the penalty,
  a group of wrong replies of different lengths is kept and teaches length alone (on the 4-token copy task a random
  model is truncated ~80% of the time, and the policy then learned to stop at once instead of to copy).
- Overlong filtering (Sec. 3.4): truncated samples are masked out of the loss.
- Soft overlong punishment (Eq. 13): with L_max the budget and L_cache the punishment interval,
      R_length(y) = 0                              if |y| <= L_max - L_cache
                  = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
                  = -1                             if |y| > L_max
  added to the task reward. Since generation stops at L_max, the -1 branch applies to truncated samples.
The clip-higher and token-level loss parts of DAPO live in ``ppo_clip`` and ``token_mean`` (see the ``dapo`` preset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError
from lmpo.registry import SELECTORS, SHAPERS


@SELECTORS.register("dynamic_sampling", paper="DAPO (dynamic sampling)", arxiv="2503.14476")
@dataclass(frozen=True)
class DynamicSampling:
    """Keep groups whose reward std exceeds ``min_std`` (DAPO Sec. 3.2, Eq. 11).

    Args:
        min_std: a group is kept when its (population) reward std is above this.
        on: ``"task"`` (default, Eq. 11): the rewards before shaping, i.e. each reward function's score
            (``batch.reward_components``; a group is kept when any of them varies within it), so shapers such as
            the overlong penalty do not decide which groups are trained on; ``"reward"``: the shaped reward the
            advantage sees. Without ``reward_components`` both use ``batch.rewards``.
    """

    min_std: float = 0.0
    on: str = "task"
    needs: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        if self.on not in ("task", "reward"):
            raise ConfigError(f'selector dynamic_sampling: on must be "task" or "reward", got {self.on!r}.')

    def __call__(self, batch: RolloutBatch) -> Tensor:
        if self.on == "task" and batch.reward_components is not None:
            cols = batch.reward_components.float()
        else:
            cols = batch.rewards.float()[:, None]
        keep = torch.zeros(batch.batch_size, dtype=torch.bool, device=cols.device)
        for k in range(cols.shape[1]):
            keep |= ops.group_std(cols[:, k], batch.group_ids, unbiased=False) > self.min_std
        return keep


@SHAPERS.register("overlong_penalty", paper="DAPO (soft overlong punishment)", arxiv="2503.14476")
@dataclass(frozen=True)
class OverlongPenalty:
    """Add DAPO's soft length penalty R_length(y) (arXiv:2503.14476 Eq. 13) to the reward.

    Args:
        horizon: L_max; ``None`` uses the generation budget ``rollout.max_new_tokens``.
        cache_length: L_cache; ``None`` uses 20% of L_max (the paper's 4096 of 20480).
        factor: scale of the penalty (1.0 in the paper).
    """

    horizon: int | None = None
    cache_length: int | None = None
    factor: float = 1.0
    needs: ClassVar[frozenset[str]] = frozenset()

    def penalty(self, lengths: Tensor, truncated: Tensor | None) -> Tensor:
        if self.horizon is None:
            raise ConfigError("shaper overlong_penalty needs horizon (L_max); the trainer fills it from rollout.max_new_tokens.")
        l_max = float(self.horizon)
        l_cache = float(self.cache_length) if self.cache_length is not None else max(1.0, round(0.2 * l_max))
        start = l_max - l_cache
        pen = torch.where(lengths <= start, torch.zeros_like(lengths), (start - lengths) / l_cache)
        pen = torch.where(lengths > l_max, -torch.ones_like(lengths), pen)
        if truncated is not None:  # generation stops at L_max: a truncated sample is an over-long one
            pen = torch.where(truncated, -torch.ones_like(pen), pen)
        return self.factor * pen

    def __call__(self, batch: RolloutBatch) -> RolloutBatch:
        lengths = ops.response_lengths(batch.response_mask)
        return batch.replace(rewards=batch.rewards + self.penalty(lengths, batch.truncated))


@SHAPERS.register("overlong_mask", paper="DAPO (overlong filtering)", arxiv="2503.14476")
@dataclass(frozen=True)
class OverlongMask:
    """Mask truncated samples out of the loss (DAPO Sec. 3.4, overlong filtering)."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> RolloutBatch:
        if batch.truncated is None:
            return batch
        return batch.replace(response_mask=batch.response_mask & ~batch.truncated[:, None])
