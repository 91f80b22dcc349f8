"""BNPO: Beta Normalization Policy Optimization.

Paper: Xiao et al. 2025, "BNPO: Beta Normalization Policy Optimization", arXiv:2506.02864 (released code:
changyi7231/BNPO, adv_estimator "bnpo"). Not TRL's ``loss_type="bnpo"`` token normaliser: this is the paper's
advantage normalisation.

With rewards rescaled to [0, 1], R~ = (R - R_min) / (R_max - R_min), and p_q = mean of R~ over prompt q's group,
the advantage divides the centred reward by a Beta density evaluated at the prompt's success rate (Sec. 4, Eq. 6/9):

    A_i = (R~_i - p_q) / f_{alpha,beta}(p_q)

The Beta parameters adapt every batch (Theorem 2 / Eq. 10), from the method-of-moments fit of the batch's
per-prompt success rates (m = mean_q p_q, v = unbiased var_q p_q):

    a = (m (1 - m) / v - 1) m,   b = (m (1 - m) / v - 1) (1 - m)
    alpha = max(1 + a / 3, 1),   beta = max(1 + b / 3, 1)

1 / f is clamped to [0, 1e6]. Special cases: alpha = beta = 1 gives REINFORCE with the group-mean baseline;
alpha = beta = 3/2 gives f(p) = (8/pi) sqrt(p (1 - p)), i.e. pi/8 times GRPO with the population std. The
"advantage decomposition" variant (Sec. 4.3) averages the BNPO advantages of each reward component.

Differences from GRPO: the normaliser is a Beta density whose shape follows the batch's success-rate distribution
instead of the group std.

Gaps filled (stated here, not in the paper):
- R_min / R_max: ``r_min`` / ``r_max`` fields, fixed at [0, 1] by default as in the released code (issue 21: lmpo
  used to take the batch min / max, which a reward-bounded paper does not; on a batch whose rewards are {0, 0.5} that
  doubled R~ and gave advantages ~3.5x the official ones). Set them to the reward function's own bounds when those
  are not [0, 1]; rewards outside the range are not clipped.
- fewer than two prompts, or v = 0 (all prompts with the same success rate): the moment fit is undefined or a point
  mass; we use alpha = beta = 1 (no normalisation).
- summed token rewards (KL-in-reward), when present, are added to the outcome reward before rescaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.params import Rule, hp, ordered
from lmpo.registry import ADVANTAGES

INV_DENSITY_MAX = 1e6


def beta_log_density(p: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """log Beta(alpha, beta) density at p in [0, 1]; xlogy keeps alpha = 1 or beta = 1 finite at the ends."""
    lbeta = torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)
    return torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p) - lbeta


def moment_beta(p_prompts: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, beta) from the batch's per-prompt success rates (BNPO Theorem 2); (1, 1) when undefined."""
    one = torch.ones((), dtype=p_prompts.dtype, device=p_prompts.device)
    if p_prompts.numel() < 2:
        return one, one
    m, v = p_prompts.mean(), p_prompts.var(unbiased=True)
    if not v > 0:
        return one, one
    c = m * (1 - m) / v - 1
    return torch.clamp_min(1 + c * m / 3, 1.0), torch.clamp_min(1 + c * (1 - m) / 3, 1.0)


@ADVANTAGES.register("bnpo", paper="BNPO: Beta Normalization Policy Optimization", arxiv="2506.02864")
@dataclass(frozen=True)
class BNPOAdvantage:
    """A = (R~ - p_q) / Beta_{alpha,beta}(p_q) with batch-adaptive alpha, beta (arXiv:2506.02864 Eq. 9-10).

    Args:
        r_min, r_max: the reward function's range, used to rescale to [0, 1] (released code: fixed 0 and 1).
        alpha, beta: fix the Beta parameters instead of fitting them (``None``: adaptive, the paper's method).
        decompose: average the BNPO advantages of each column of ``reward_components`` (advantage decomposition).
    """

    r_min: float = 0.0
    r_max: float = 1.0
    alpha: float | None = hp(None, gt=0)
    beta: float | None = hp(None, gt=0)
    decompose: bool = False
    needs: ClassVar[frozenset[str]] = frozenset()
    constraints: ClassVar[tuple[Rule, ...]] = (ordered("r_min", "r_max", strict=True),)

    def single(self, r: Tensor, group_ids: Tensor) -> Tensor:
        """BNPO advantage (B,) of one reward column (B,)."""
        r01 = (r - self.r_min) / (self.r_max - self.r_min)  # r_min < r_max is a declared constraint
        p = ops.group_mean(r01, group_ids)
        if self.alpha is None or self.beta is None:
            inv, n = ops.group_index(group_ids)
            first = torch.full((n,), -1, dtype=torch.long).scatter_reduce(
                0, inv, torch.arange(r.numel()), reduce="amax", include_self=True)
            a_fit, b_fit = moment_beta(p[first].clamp(0, 1))  # one p per prompt
        a = a_fit if self.alpha is None else torch.tensor(self.alpha, dtype=r.dtype)
        b = b_fit if self.beta is None else torch.tensor(self.beta, dtype=r.dtype)
        inv_f = torch.exp(-beta_log_density(p.clamp(0, 1), a.to(r.dtype), b.to(r.dtype))).clamp(0, INV_DENSITY_MAX)
        return ops.group_centered(r01, group_ids) * inv_f

    def __call__(self, batch: RolloutBatch) -> Tensor:
        if self.decompose and batch.reward_components is not None:
            comps = batch.reward_components
            adv = sum(self.single(comps[:, k], batch.group_ids) for k in range(comps.shape[1])) / comps.shape[1]
        else:
            r = batch.rewards
            if batch.token_rewards is not None:
                r = r + ops.masked_sum(batch.token_rewards, batch.response_mask, dim=-1).to(r.dtype)
            adv = self.single(r, batch.group_ids)
        return ops.zero_outside(adv[:, None], batch.response_mask)


# Released run.sh: clip 0.2 / 0.28, dual-clip c = 10, seq-mean-token-sum aggregation, no KL.
PRESETS = {
    "bnpo": {
        "advantage": {"name": "bnpo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2, "epsilon_high": 0.28, "dual_clip": 10.0},
        "aggregator": {"name": "seq_mean_token_sum"},
        "kl": {"beta": 0.0},
    },
}
