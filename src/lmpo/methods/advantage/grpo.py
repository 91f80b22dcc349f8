"""GRPO group-relative advantage, with the Dr.GRPO (no std) and batch-std variants.

Papers:
- Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
  arXiv:2402.03300, Sec. 4.1.2 (outcome supervision): A_i = (R_i - mean_j R_j) / std_j R_j, the same for every token.
- Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO), arXiv:2503.20783,
  Eq. 3: drop the std division (question-level difficulty bias): A_i = R_i - mean_j R_j.
- Batch-level std ("group mean, batch std", as in Hu et al. REINFORCE++-baseline, arXiv:2501.03262, and
  Liu et al. 2025 "Part I: Tricks or Traps?", arXiv:2508.08221): divide by the std over the whole batch.

R is the outcome return: ``batch.rewards`` plus the sum of ``batch.token_rewards`` when present (KL-in-reward or
process rewards). std uses Bessel's correction, as ``torch.std`` in TRL and verl.

Singleton groups (a prompt with one scored response, e.g. after filtering or with uneven planners): by default the
advantage is 0. The formula itself gives it: the group mean of one reward is that reward, so R - mean = 0 (and the
std of one value is taken as 0, not NaN); a group of one has no baseline, so it carries no group-relative signal, and
passing R through would mix an uncentred REINFORCE term of another scale into a centred batch. verl's
``compute_grpo_outcome_advantage`` instead sets mean 0 and std 1 for a group of one, so the raw score passes through
(R / (1 + eps) with the std division); ``singleton="raw"`` reproduces that for parity (with ``std_level="batch"``
the singleton's R is divided by the batch std like every other row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES


def outcome_returns(batch: RolloutBatch) -> Tensor:
    """Scalar return per row (B,): outcome reward plus summed token rewards (masked)."""
    r = batch.rewards.float()
    if batch.token_rewards is not None:
        r = r + ops.masked_sum(batch.token_rewards.float(), batch.response_mask, dim=-1)
    return r


def broadcast(adv: Tensor, mask: Tensor) -> Tensor:
    """(B,) -> (B, T), zero on masked tokens."""
    return ops.zero_outside(adv[:, None].to(torch.float32), mask)


@ADVANTAGES.register("grpo", paper="DeepSeekMath (GRPO); Dr. GRPO", arxiv="2402.03300")
@dataclass(frozen=True)
class GRPOAdvantage:
    """Group-relative advantage A_i = (R_i - mean_g R) / (std R + eps); arXiv:2402.03300 Sec. 4.1.2.

    Args:
        scale_by_std: divide by the std (False gives Dr. GRPO, arXiv:2503.20783 Eq. 3).
        std_level: "group" (std within each prompt's group) or "batch" (one std over the batch).
        eps: added to the std so an all-equal group gives A = 0 rather than 0/0.
        singleton: "zero" (a group of one gets A = 0, the group-relative formula) or "raw" (verl: mean 0, std 1).
    """

    scale_by_std: bool = True
    std_level: str = hp("group", choices=("group", "batch"))
    eps: float = 1e-6
    singleton: str = hp("zero", choices=("zero", "raw"))
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = outcome_returns(batch)
        adv = ops.group_centered(r, batch.group_ids)
        alone = ops.group_count(batch.group_ids, r.dtype) == 1 if self.singleton == "raw" else None
        if alone is not None:  # verl: a group of one has mean 0 (and std 1 below)
            adv = torch.where(alone, r, adv)
        if self.scale_by_std:
            if self.std_level == "group":
                std = ops.group_std(r, batch.group_ids)
                if alone is not None:
                    std = torch.where(alone, torch.ones_like(std), std)
            else:  # one std over the batch (0, not NaN, for a single row)
                std = ops.masked_var(r, torch.ones_like(r, dtype=torch.bool)).sqrt().expand_as(r)
            den = std + self.eps  # a zero std means zero deviations: / 1 keeps eps = 0 finite
            adv = adv / torch.where(den > 0, den, torch.ones_like(den))
        return broadcast(adv, batch.response_mask)
