"""TOPR: Tapered Off-Policy REINFORCE.

Paper: Le Roux, Bellemare, Lebensold, Bergeron, Greaves, Frechette, Pelletier, Thibodeau-Laufer, Toth, Work 2025,
"Tapered Off-Policy REINFORCE: Stable and efficient reinforcement learning for LLMs", arXiv:2503.14286.

Eq. (TOPR gradient, Sec. 3): with behaviour policy mu, return R(tau) (reward minus the REINFORCE baseline c),
    grad J = sum_{R >= 0} mu(tau) R(tau) grad log pi(tau)
           + sum_{R < 0}  mu(tau) [pi(tau)/mu(tau)]_0^1 R(tau) grad log pi(tau),
where [x]_0^1 = clip(x, 0, 1) is a constant (no gradient flows through it). Per sample this is the loss
    l = -w R log pi(tau),   w = 1 if R >= 0 else sg(min(1, pi(tau)/mu(tau))),
which we write per token (log pi(tau) = sum_t log pi(y_t)):  l_t = -w A_t log pi(y_t). The sequence-level sum is
recovered with the ``seq_mean_token_sum`` aggregator (the paper's (1/N) sum_i over trajectories).

Differs from GRPO: no clipping and no ratio on positives (an SFT-like push up at full speed however unlikely the
sample has become), a truncated, *tapering* importance weight on negatives (once a bad sample is less likely under
pi than under mu its push-down shrinks with pi/mu, so negatives cannot drive log-probs to -inf off-policy), no KL.

Gaps filled:
- mu is the policy that produced the data; in this pipeline that is ``old_logprobs`` (pi_old, equal to the sampler up
  to numerics). On-policy (pi = pi_old) every weight is 1 and TOPR is plain REINFORCE.
- ``level="sequence"`` (paper) uses pi(tau)/mu(tau) = exp(sum_t log r_t); ``level="token"`` clips each token ratio
  (the ROLL port). The sign of the return decides the weight; with token-level advantages the sign is taken per token.
- ``positive_weight`` / ``negative_weight`` (default 1, as in the paper; ROLL exposes both) scale the two sets.
- The baseline c is the advantage stage's job; the preset uses the group mean (A = R - mean), so each group has
  positive and negative samples (the paper stresses that c sets the effective positive/negative mix).
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

LEVELS = ("sequence", "token")


@LOSSES.register("topr", paper="Tapered Off-Policy REINFORCE: Stable and efficient reinforcement learning for LLMs",
                 arxiv="2503.14286")
@dataclass(frozen=True)
class TOPRLoss:
    """l_t = -w A_t log pi(y_t), w = 1 for A >= 0 and sg(min(1, pi/mu)) for A < 0 (arXiv:2503.14286 Sec. 3).

    Args:
        level: "sequence" (pi(tau)/mu(tau), the paper) or "token" (per-token ratio, the ROLL port).
        positive_weight / negative_weight: extra coefficients on the two sets (paper: 1, 1).
    """

    level: str = hp("sequence", choices=LEVELS)
    positive_weight: float = hp(1.0, ge=0)
    negative_weight: float = hp(1.0, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        adv = batch.advantages
        diff = (logprobs - batch.old_logprobs).detach()
        if self.level == "sequence":
            log_ratio = ops.masked_sum(diff, mask, dim=-1)[:, None].expand_as(diff)  # log pi(tau)/mu(tau)
        else:
            log_ratio = diff
        # [pi/mu]_0^1 = exp(min(log ratio, 0)): never overflows, and ratio >= 0 so the lower clip is automatic.
        taper = log_ratio.clamp(max=0.0).exp()
        neg = adv < 0
        w = torch.where(neg, self.negative_weight * taper, torch.full_like(taper, self.positive_weight))
        lp = ops.zero_outside(logprobs, mask)
        loss = -w * adv * lp
        metrics = {
            "loss/neg_weight_mean": ops.masked_mean(taper, mask & neg).detach(),
            "loss/neg_frac": ops.masked_mean(neg.float(), mask).detach(),
        }
        return LossOut(ops.zero_outside(loss, mask), metrics)


PRESETS = {
    # TOPR (arXiv:2503.14286): group-mean baseline (no std scaling), sequence-level tapered IS on negatives,
    # trajectory log-prob (token sum per sequence, mean over sequences), no KL.
    "topr": {
        "advantage": {"name": "grpo", "scale_by_std": False},
        "loss": {"name": "topr", "level": "sequence"},
        "aggregator": {"name": "seq_mean_token_sum"},
        "kl": {"beta": 0.0},
    },
}
