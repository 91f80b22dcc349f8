"""PPO clipped surrogate with decoupled clip range (DAPO clip-higher) and dual clip.

Papers:
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347, Eq. 7:
  l_t = -min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t), r_t = pi(o_t)/pi_old(o_t). GRPO (arXiv:2402.03300 Eq. 3) uses it.
- Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv:2503.14476, Eq. 10:
  separate eps_low / eps_high ("clip-higher", default 0.2 / 0.28).
- Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning", arXiv:1912.09729,
  Eq. 5 (dual clip): for A_t < 0 the loss is additionally bounded by -c * A_t (c > 1, typically 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.params import hp
from lmpo.registry import LOSSES


def clipped_surrogate(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float, dual_clip: float | None):
    """Per-token PPO loss and a clipped indicator, shared by the token-ratio and sequence-ratio losses."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    if dual_clip is not None:
        bound = -adv * dual_clip
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    return loss, is_clipped


@LOSSES.register("ppo_clip", paper="Proximal Policy Optimization; DAPO clip-higher; dual-clip PPO", arxiv="1707.06347")
@dataclass(frozen=True)
class PPOClipLoss:
    """Token-level clipped surrogate -min(r A, clip(r, 1-eps_low, 1+eps_high) A); arXiv:1707.06347 Eq. 7.

    Args:
        epsilon: lower clip range eps_low (TRL's ``epsilon``).
        epsilon_high: upper clip range; ``None`` means symmetric (= epsilon). DAPO uses 0.28.
        dual_clip: the dual-clip constant c (> 1) bounding the loss of negative-advantage tokens; ``None`` = off.
    """

    epsilon: float = hp(0.2, ge=0)
    epsilon_high: float | None = hp(None, ge=0)
    dual_clip: float | None = hp(None, gt=1)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        ratio = ops.token_ratio(logprobs, batch.old_logprobs)
        loss, clipped = clipped_surrogate(ratio, batch.advantages, self.epsilon, eps_high, self.dual_clip)
        mask = batch.response_mask
        metrics = {
            "loss/clip_frac": ops.masked_mean(clipped.float(), mask).detach(),
            "loss/ratio_mean": ops.masked_mean(ratio, mask).detach(),
        }
        return LossOut(ops.zero_outside(loss, mask), metrics)
