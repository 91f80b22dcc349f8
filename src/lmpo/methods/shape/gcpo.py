"""GCPO (GeometryZero): group-contrastive masking of a tool / auxiliary-construction reward, plus a length reward.

Paper: Wang et al. 2025, "GeometryZero: Improving Geometry Solving for LLM with Group Contrastive Policy
Optimization", arXiv:2506.07160 (code ekonwang/GeometryZero, not available here). Fidelity: reconstructed; the
masking rule follows the paper's description, the length reward's exact form was not available.

An unconditional "you constructed something" reward (Eq. 3: R_aux(o) = 1 if o contains an auxiliary construction)
makes the model construct everywhere. Group Contrastive Masking decides per prompt, from its G rollouts, whether
construction helped: with S_aux / S_no the rollouts with / without a construction and a_aux, a_no their mean
accuracies,
    M(x) = +1 if a_aux - a_no > eps;  -1 if a_aux - a_no < -eps;  0 otherwise (or if S_aux or S_no is empty)
    R(o_i) = R_task(o_i) + aux_weight * M(x) * R_aux(o_i) + R_len(o_i)
and the advantage is plain GRPO on R. With M = 0 and R_len = 0 it is GRPO.

Differences from GRPO: the tool reward's sign is set per prompt by a contrast inside the group (a Shaper here).

Gaps filled (guesses):
- R_task is ``batch.rewards`` (accuracy and format rewards already summed by the reward set); accuracy for the
  contrast is column ``accuracy_index`` of ``reward_components`` (or ``batch.rewards`` without components).
- R_aux is detected in the completion text carried in ``batch.meta`` with ``aux_pattern`` (``<aux>...</aux>``, the
  paper's construction tags); rows without completion text count as R_aux = 0.
- eps = 0.1 (the card's example); aux_weight = 1.
- R_len = length_weight * min(|o| / L, 1) with L the generation budget, granted to correct answers only (so length is
  never rewarded for its own sake); length_weight = 0.1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError
from lmpo.methods.params import Rule, hp, is_regex, rule
from lmpo.registry import SHAPERS


def aux_flags(batch: RolloutBatch, pattern: str) -> Tensor:
    """R_aux (B,) float: 1 where the row's completion text contains an auxiliary construction."""
    if not batch.meta:
        return torch.zeros_like(batch.rewards)
    rx = re.compile(pattern, flags=re.DOTALL)
    hits = [1.0 if rx.search(str(m.get("completion", ""))) else 0.0 for m in batch.meta]
    return torch.tensor(hits, dtype=batch.rewards.dtype, device=batch.rewards.device)


def contrastive_mask(acc: Tensor, aux: Tensor, group_ids: Tensor, eps: float) -> Tensor:
    """M(x) per row (B,) in {-1, 0, +1}: sign of (mean acc with construction - mean acc without), margin eps."""
    n_aux = ops.group_sum(aux, group_ids)
    n_no = ops.group_sum(1 - aux, group_ids)
    a_aux = ops.group_sum(acc * aux, group_ids) / n_aux.clamp_min(1)
    a_no = ops.group_sum(acc * (1 - aux), group_ids) / n_no.clamp_min(1)
    diff = a_aux - a_no
    m = torch.where(diff > eps, 1.0, torch.where(diff < -eps, -1.0, 0.0)).to(acc.dtype)
    return ops.zero_outside(m, (n_aux > 0) & (n_no > 0))


@SHAPERS.register("gcpo", paper="GeometryZero: Group Contrastive Policy Optimization (GCPO)", arxiv="2506.07160",
                  fidelity="reconstructed")
@dataclass(frozen=True)
class GroupContrastiveShaper:
    """R + aux_weight * M(x) * R_aux + R_len with GCPO's group-contrastive mask M (arXiv:2506.07160).

    Args:
        eps: margin of the accuracy contrast.
        aux_weight: scale of the (masked) construction reward.
        aux_pattern: regex that marks an auxiliary construction in the completion.
        accuracy_index: column of ``reward_components`` holding accuracy (``None``: use ``batch.rewards``).
        correct_threshold: an answer is correct (eligible for R_len) when its accuracy exceeds this.
        length_weight: scale of the length reward (0 disables it).
        horizon: L for the length reward; ``None`` uses ``rollout.max_new_tokens``.
    """

    eps: float = hp(0.1, ge=0)
    aux_weight: float = hp(1.0, ge=0)
    aux_pattern: str = r"<aux>.*?</aux>"
    accuracy_index: int | None = 0
    correct_threshold: float = 0.5
    length_weight: float = hp(0.1, ge=0)
    horizon: int | None = hp(None, ge=1)
    needs: ClassVar[frozenset[str]] = frozenset()
    constraints: ClassVar[tuple[Rule, ...]] = (
        rule(lambda aux_pattern: is_regex(aux_pattern), "{aux_pattern} must be a valid regular expression"),
    )

    def accuracy(self, batch: RolloutBatch) -> Tensor:
        c = batch.reward_components
        if self.accuracy_index is None or c is None:
            return batch.rewards
        if not -c.shape[1] <= self.accuracy_index < c.shape[1]:
            raise ConfigError(f"shapers[].accuracy_index={self.accuracy_index} but the batch has "
                              f"{c.shape[1]} reward components.")
        return c[:, self.accuracy_index].to(batch.rewards.dtype)

    def __call__(self, batch: RolloutBatch) -> RolloutBatch:
        acc = self.accuracy(batch)
        aux = aux_flags(batch, self.aux_pattern)
        m = contrastive_mask(acc, aux, batch.group_ids, self.eps)
        r = batch.rewards + self.aux_weight * m * aux
        if self.length_weight > 0:
            if self.horizon is None:
                raise ConfigError("shaper gcpo needs horizon (L) for its length reward; the trainer fills it "
                                  "from rollout.max_new_tokens.")
            frac = (ops.response_lengths(batch.response_mask).to(r.dtype) / float(self.horizon)).clamp(max=1.0)
            r = r + ops.zero_outside(self.length_weight * frac, acc > self.correct_threshold)
        return batch.replace(rewards=r)


# GRPO normalisation on the shaped reward (the paper builds on GRPO; its clip/KL values were not read: GRPO's).
PRESETS = {
    "gcpo": {
        "shapers": [{"name": "gcpo"}],
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.04, "estimator": "k3", "mode": "loss"},
    },
}
