"""MinPRO: Minimum Prefix Ratio (a non-cumulative stand-in for the prefix importance ratio).

Paper: Lei, Cheng, Tao 2026, "A Step Back: Prefix Importance Ratio Stabilizes Policy Optimization",
arXiv:2601.22718. Reconstructed from the abstract and the method card (the equations were not readable to us).
For off-policy data the exact correction of token t is the prefix ratio Pi_t = prod_{i<=t} rho_i,
rho_i = pi(o_i)/pi_old(o_i); PPO/GRPO keep only rho_t. MinPRO replaces the unstable cumulative prefix part
prod_{i<t} rho_i by the smallest single-token ratio seen before t:
    m_t = min_{i<t} rho_i  (m = 1 when no earlier trained token),   l_t = sg(m_t) * l^PPO_t(rho_t)
with l^PPO the clipped surrogate of ``ppo_clip``. Tokens after any step where the policy moved away from the
behaviour policy (a small rho) are down-weighted; the weight is bounded by the smallest ratio and never compounds.
Differs from GRPO: a detached, prefix-dependent weight on each token's clipped term; on-policy (all rho = 1) the
loss is GRPO's exactly.
Gaps filled: (1) m_t is a stop-gradient factor on GRPO's clipped term (one of the two readings on the card);
(2) m_t is not capped at 1 (the card's worked example keeps m = 1.2); ``cap`` (default None) optionally caps it;
(3) tokens outside ``response_mask`` (padding, tool output) are skipped in the running minimum; (4) clip range 0.2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.loss.ppo_clip import clipped_surrogate
from lmpo.methods.params import hp
from lmpo.registry import LOSSES


def prefix_min_ratio(ratio: Tensor, mask: Tensor) -> Tensor:
    """m_t = min of ``ratio`` over earlier masked-in positions of the row (1 where there is none), (B, T)."""
    inf = torch.full_like(ratio, float("inf"))
    running = torch.cummin(torch.where(mask, ratio, inf), dim=-1).values
    exclusive = torch.cat([inf[:, :1], running[:, :-1]], dim=-1)
    return torch.where(torch.isinf(exclusive), torch.ones_like(ratio), exclusive)


@LOSSES.register("minpro", paper="A Step Back: Prefix Importance Ratio Stabilizes Policy Optimization",
                 arxiv="2601.22718", fidelity="reconstructed")
@dataclass(frozen=True)
class MinPROLoss:
    """PPO clip loss weighted by sg(min of the earlier token ratios); arXiv:2601.22718 (reconstructed).

    Args:
        epsilon / epsilon_high: the clip range of the per-token PPO term.
        cap: optional upper bound on the prefix weight (``None`` = uncapped).
    """

    epsilon: float = hp(0.2, ge=0)
    epsilon_high: float | None = hp(None, ge=0)
    cap: float | None = hp(None, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        ratio = ops.token_ratio(logprobs, batch.old_logprobs)
        loss, clipped = clipped_surrogate(ratio, batch.advantages, self.epsilon, eps_high, None)
        weight = prefix_min_ratio(ratio.detach(), mask)
        if self.cap is not None:
            weight = weight.clamp(max=self.cap)
        metrics = {
            "loss/clip_frac": ops.masked_mean(clipped.float(), mask).detach(),
            "loss/ratio_mean": ops.masked_mean(ratio, mask).detach(),
            "loss/prefix_weight_mean": ops.masked_mean(weight, mask),
        }
        return LossOut(ops.zero_outside(weight * loss, mask), metrics)


PRESETS = {
    # MinPRO (arXiv:2601.22718): GRPO advantages and clip 0.2 with the prefix-minimum weight, seq-mean-token-mean,
    # no KL (the paper's exact aggregation and KL were not recovered; these follow its GRPO baseline).
    "minpro": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "minpro", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
