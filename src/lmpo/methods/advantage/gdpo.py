"""GDPO: Group reward-Decoupled Normalization Policy Optimization for multi-reward RL.

Paper: Liu et al. 2026, "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL
Optimization", arXiv:2601.05242.

With K reward functions, GRPO sums them and z-scores the sum inside each group, so different reward combinations
collapse onto the same advantage (group {(1,1),(0,0),(0,0)} and group {(1,0),(0,0),(0,0)} both give
[1.155, -0.577, -0.577]). GDPO normalises each reward separately inside the group, sums, then re-normalises the
sum over the whole batch so its scale does not grow with K:

    A_k^(j)   = (r_k^(j) - mean_{group} r_k) / (std_{group} r_k + eps)          (per-reward group z-score)
    A_sum^(j) = sum_k w_k A_k^(j)                                               (w_k = 1 by default)
    A^(j)     = (A_sum^(j) - mean_batch A_sum) / (std_batch A_sum + eps)        (batch normalisation)

and A^(j) is used for every token of response j with the usual clipped surrogate.

Differences from GRPO: the group statistics are taken per reward column of ``batch.reward_components`` (B, K)
instead of on the summed reward, and a batch-level normalisation follows.

Gaps filled:
- std is Bessel-corrected (``torch.std``), the convention of the released TRL/verl code; singleton groups give 0.
- eps = 1e-4 on every std, the authors' value (lmpo used 1e-6 until issue 21).
- the batch normalisation runs over the rows that have trainable tokens only, as the released code's masked
  whitening does: a row whose tokens were all masked (e.g. by overlong masking) keeps its group statistics but
  neither shifts the batch mean nor widens the batch std (until issue 21 lmpo whitened over every row).
- ``batch.rewards`` is used as the single column when ``reward_components`` is absent (K = 1).
- summed token rewards (KL-in-reward, process rewards), when present, enter as one more column.
- The reward weights of the config's reward set are not carried in the batch; ``weights`` (w_k) is this component's
  own field (``None`` = all ones). Shapers that rewrite ``batch.rewards`` do not change the components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError
from lmpo.methods.params import Rule, hp, rule
from lmpo.registry import ADVANTAGES


def reward_columns(batch: RolloutBatch) -> Tensor:
    """(B, K) reward matrix: the per-function components (or the scalar reward), plus summed token rewards if any."""
    cols = batch.reward_components if batch.reward_components is not None else batch.rewards[:, None]
    if batch.token_rewards is not None:
        tr = ops.masked_sum(batch.token_rewards, batch.response_mask, dim=-1).to(cols.dtype)
        cols = torch.cat([cols, tr[:, None]], dim=1)
    return cols


@ADVANTAGES.register("gdpo", paper="GDPO: Group reward-Decoupled Normalization Policy Optimization", arxiv="2601.05242")
@dataclass(frozen=True)
class GDPOAdvantage:
    """Per-reward group z-scores, summed with weights, then normalised over the batch (arXiv:2601.05242).

    Args:
        weights: w_k per reward column (``None`` = 1 for every column); length must match K at call time.
        batch_norm: apply the batch-level re-normalisation of the summed advantage (the paper's default).
        eps: added to every std (authors: 1e-4).
    """

    weights: list[float] | None = None
    batch_norm: bool = True
    eps: float = hp(1e-4, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset()
    constraints: ClassVar[tuple[Rule, ...]] = (
        rule(lambda weights: weights is None or len(weights) > 0,
             "{weights} must be a non-empty list of numbers or null"),
    )

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = reward_columns(batch)
        K = r.shape[1]
        w = torch.ones(K, dtype=r.dtype) if self.weights is None else torch.tensor(self.weights, dtype=r.dtype)
        if w.numel() != K:
            raise ConfigError(f"advantage.weights has {w.numel()} entries but the batch has {K} reward columns.")
        a_sum = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
        for k in range(K):  # K is small (a handful of reward functions)
            col = r[:, k]
            std = ops.group_std(col, batch.group_ids) + self.eps
            # a constant column has exactly zero deviations: 0 / 1 keeps eps = 0 finite (and its gradient too)
            a_k = ops.group_centered(col, batch.group_ids) / torch.where(std > 0, std, torch.ones_like(std))
            a_sum = a_sum + w[k] * a_k
        adv = a_sum
        if self.batch_norm:
            trained = batch.response_mask.any(-1)  # rows with trainable tokens (released code: masked whitening)
            adv = ops.masked_whiten(a_sum, trained, eps=self.eps)
        return ops.zero_outside(adv[:, None], batch.response_mask)


# The paper feeds A into the usual GRPO/DAPO clipped surrogate; the card gives no loss settings, so (gap) we use
# clip 0.2, DAPO's token-level mean and no KL.
PRESETS = {
    "gdpo": {
        "advantage": {"name": "gdpo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
