"""GMPO: Geometric-Mean Policy Optimization (the sequence ratio is the geometric mean of clipped token ratios).

Paper: Zhao et al. 2025, "Geometric-Mean Policy Optimization", arXiv:2507.20673 (released code: callsys/GMPO; verl
``compute_policy_loss_geo_mean``). GRPO maximises the *arithmetic* mean over tokens of r_t A; GMPO maximises the
*geometric* mean, which an outlier ratio moves far less:
    J = E[(1/G) sum_i  A_i * (prod_t  rc_{i,t}) ^ (1/|o_i|)],
where rc_{i,t} is the token ratio clipped *per token* in log space and pessimistically by the sign of A (for A > 0
the log-ratio is capped at eps_high, for A < 0 floored at -eps_low: sgn(A) min(sgn(A) log r, sgn(A) clip(log r)));
the paper's default range is (e^-0.4, e^0.4) (eps_low = eps_high = 0.4 in log space), wider than GRPO's because the
geometric mean is less sensitive to outliers. Its gradient is the policy gradient weighted by the sequence's
geometric-mean ratio: d l_i / d log pi_t = -A_i s_i / |o_i| on unclipped tokens, 0 on clipped ones.
Differs from GRPO: one ratio per sequence (like GSPO) built from token-clipped ratios; a single token with an extreme
ratio changes s_i by a factor of at most e^(eps/|o_i|).

In lmpo the sequence loss -A_i s_i is spread evenly over the sequence's trained tokens (each gets -A_i s_i / |o_i|),
so the ``seq_mean_token_sum`` aggregator gives the paper's (1/G) sum_i. A_i is the mean of the row's token advantages
(GMPO uses sequence-level advantages; verl does the same).
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


@LOSSES.register("gmpo", paper="Geometric-Mean Policy Optimization", arxiv="2507.20673")
@dataclass(frozen=True)
class GMPOLoss:
    """-A_i exp(mean_t sgn(A) min(sgn(A) log r_t, sgn(A) clip(log r_t, -eps_low, eps_high))); arXiv:2507.20673.

    Args:
        epsilon: eps_low, the lower clip of the token log-ratio (-0.4 in the paper).
        epsilon_high: eps_high, the upper clip of the token log-ratio; ``None`` = epsilon.
    """

    epsilon: float = hp(0.4, ge=0)
    epsilon_high: float | None = hp(None, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        hi = self.epsilon if self.epsilon_high is None else self.epsilon_high
        logr = ops.zero_outside(ops.log_ratio(logprobs, batch.old_logprobs), mask)
        adv = ops.masked_mean(batch.advantages, mask, dim=-1)  # (B,) sequence advantage
        sgn = torch.sign(adv)[:, None]
        clipped = logr.clamp(-self.epsilon, hi)
        pessimistic = sgn * torch.minimum(sgn * logr, sgn * clipped)
        n = mask.to(logr.dtype).sum(-1)
        seq_ratio = (ops.masked_sum(pessimistic, mask, dim=-1) / n.clamp_min(1.0)).exp()  # (B,)
        seq_loss = -adv * seq_ratio
        per_token = (seq_loss / n.clamp_min(1.0))[:, None].expand_as(logr)
        rows = mask.any(-1)
        metrics = {
            # tokens whose clip binds (zero gradient); verl counts every token outside the range
            "loss/clip_frac": ops.masked_mean((pessimistic != logr).float(), mask).detach(),
            "loss/ratio_mean": ops.masked_mean(seq_ratio, rows).detach(),
        }
        return LossOut(ops.zero_outside(per_token, mask), metrics)


PRESETS = {
    # GMPO (arXiv:2507.20673): GRPO group advantages, geometric-mean sequence ratio with token clipping at e^+-0.4,
    # mean over sequences, no KL (the paper trains without it).
    "gmpo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "gmpo", "epsilon": 0.4, "epsilon_high": 0.4},
        "aggregator": {"name": "seq_mean_token_sum"},
        "kl": {"beta": 0.0},
    },
}
