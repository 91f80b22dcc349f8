"""SAPO: Soft Adaptive Policy Optimization (a smooth sigmoid gate instead of the hard clip).

Paper: Gao et al. (Qwen team) 2025, "Soft Adaptive Policy Optimization", arXiv:2511.20347.
With r_t = pi(o_t)/pi_old(o_t) and tau_t = tau_pos if A_t > 0 else tau_neg, the surrogate (paper Sec. 3; the
equation numbers were not recoverable from the text we could read) is
    J = E[(1/G) sum_i (1/|o_i|) sum_t f(r_t; tau_t) A_t],   f(r; tau) = (4 / tau) * sigmoid(tau (r - 1)),
so the per-token loss is l_t = -f(r_t; tau_t) A_t. Its gradient is
    d l_t / d log pi(o_t) = -A_t * w_t * r_t,   w_t = 4 s (1 - s) = sech^2(tau (r_t - 1) / 2),
    s = sigmoid(tau (r_t - 1)),
a bell-shaped weight on the usual importance-sampled policy gradient that equals 1 on-policy (r = 1).
Differs from GRPO: no hard clip and no zeroed gradients; far-off-policy tokens are attenuated smoothly and one at a
time, and negative-advantage tokens use a larger temperature (their weight decays faster). tau -> 0 recovers the
unclipped IS policy gradient. Defaults tau_pos = 1.0, tau_neg = 1.05 (the paper's Qwen3-30B-A3B setting); A_t = 0
tokens carry no loss whichever temperature they get. Sequence-mean token-mean aggregation as in the paper.
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


@LOSSES.register("sapo", paper="Soft Adaptive Policy Optimization", arxiv="2511.20347")
@dataclass(frozen=True)
class SAPOLoss:
    """Soft-gated surrogate -(4/tau) sigmoid(tau (r - 1)) A, tau by the sign of A; arXiv:2511.20347 Sec. 3.

    Args:
        tau_pos: gate temperature for positive-advantage tokens.
        tau_neg: gate temperature for non-positive-advantage tokens (larger = faster decay off-policy).
    """

    tau_pos: float = hp(1.0, gt=0)
    tau_neg: float = hp(1.05, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        adv = batch.advantages
        ratio = ops.token_ratio(logprobs, batch.old_logprobs)
        tau = torch.where(adv > 0, torch.full_like(ratio, self.tau_pos), torch.full_like(ratio, self.tau_neg))
        gate = torch.sigmoid(tau * (ratio - 1.0))
        loss = -(4.0 / tau) * gate * adv
        weight = 4.0 * gate * (1.0 - gate)  # sech^2(tau (r - 1) / 2): the soft trust-region weight
        metrics = {
            "loss/gate_weight_mean": ops.masked_mean(weight, mask).detach(),
            "loss/ratio_mean": ops.masked_mean(ratio, mask).detach(),
        }
        return LossOut(ops.zero_outside(loss, mask), metrics)


PRESETS = {
    # SAPO (arXiv:2511.20347): GRPO group advantages, soft gate tau_pos 1.0 / tau_neg 1.05, seq-mean-token-mean, no KL.
    "sapo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "sapo", "tau_pos": 1.0, "tau_neg": 1.05},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
