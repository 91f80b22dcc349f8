"""CISPO: Clipped IS-weight Policy Optimization (MiniMax-M1).

Paper: MiniMax et al. 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention",
arXiv:2506.13585, Sec. 3.1 (the CISPO objective). With r_t = pi(o_t)/pi_old(o_t):
    J = E[ (1/sum_i |o_i|) sum_i sum_t sg(r^_t) * A_t * log pi(o_t) ],   r^_t = clip(r_t, 1 - eps_low, 1 + eps_high),
a REINFORCE-form loss l_t = -sg(r^_t) A_t log pi(o_t) whose gradient is -r^_t A_t d log pi(o_t). The paper's unified
form multiplies each term by a token mask M_t (0 where PPO would clip: A > 0 and r > 1 + eps_high, or A < 0 and
r < 1 - eps_low); ``token_mask=True`` enables it (off in CISPO proper).
Differs from GRPO: the importance weight is clipped and detached instead of the update, so no token's gradient is
ever zeroed (low-probability "fork" tokens keep learning); aggregation is a token mean over the whole batch.
Gaps filled: the paper sets eps_low very large (no lower bound) -> ``epsilon=None``; it tunes only eps_high and does
not publish its value: we default to eps_high = 3.0 (weight cap 4), the default cap of Thinking Machines' Tinker
CISPO loss. On-policy (r = 1) the loss is REINFORCE, -A log pi.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.params import hp
from lmpo.registry import LOSSES


@LOSSES.register("cispo", paper="MiniMax-M1 (CISPO: clipped IS-weight policy optimization)", arxiv="2506.13585")
@dataclass(frozen=True)
class CISPOLoss:
    """REINFORCE loss weighted by a clipped, detached IS ratio: -sg(clip(r)) A log pi; arXiv:2506.13585 Sec. 3.1.

    Args:
        epsilon: eps_low of the weight clip; ``None`` = no lower bound (the paper's choice).
        epsilon_high: eps_high; the weight is capped at 1 + eps_high.
        token_mask: the paper's unified form: drop tokens PPO's clip would drop.
    """

    epsilon: float | None = hp(None, ge=0, le=1)
    epsilon_high: float = hp(3.0, ge=0)
    token_mask: bool = False
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        adv = batch.advantages
        ratio = ops.token_ratio(logprobs, batch.old_logprobs).detach()
        low = 0.0 if self.epsilon is None else 1.0 - self.epsilon
        high = 1.0 + self.epsilon_high
        weight = ratio.clamp(low, high)
        clipped = (ratio > high) | (ratio < low)
        keep = mask
        if self.token_mask:
            keep = mask & ~(((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low)))
        # Masked-out log-probs can be -inf or garbage; zero them before they meet the weight (0 * inf = NaN).
        loss = -weight * adv * ops.zero_outside(logprobs, keep)
        metrics = {
            "loss/clip_frac": ops.masked_mean(clipped.float(), mask).detach(),
            "loss/is_weight_mean": ops.masked_mean(weight, mask).detach(),
            "loss/ratio_mean": ops.masked_mean(ratio, mask).detach(),
        }
        return LossOut(ops.zero_outside(loss, keep), metrics)


PRESETS = {
    # CISPO (arXiv:2506.13585): GRPO group advantages, weight clip with no lower bound, token-level mean, no KL.
    "cispo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "cispo", "epsilon": None, "epsilon_high": 3.0},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
