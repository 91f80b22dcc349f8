"""FiberPO: Fibration Policy Optimization (a trajectory-level gate times a token-residual gate).

Paper: Li, Tsu, Zhang, Xue, He 2026, "Fibration Policy Optimization", arXiv:2603.08239. Reconstructed from the
abstract and the method card: the exact gate functions and equations were not available to us.
Fibre-bundle split of the token log-ratio l_t = log pi(o_t) - log pi_old(o_t) of response i:
    base (trajectory aggregate)  b_i = (1/|o_i|) sum_t l_t,     fibre (token residual)  u_t = l_t - b_i,
so r_t = exp(b_i) * exp(u_t) and sum_t u_t = 0. Each level gets its own PPO-style (sign-aware, pessimistic) gate:
    fibre:  g_t = min(v_t A_t, clip(v_t, 1 - eps_f, 1 + eps_f_high) A_t),        v_t = exp(u_t)
    base:   J_t = min(s_i g_t, clip(s_i, 1 - eps_b, 1 + eps_b_high) g_t),         s_i = exp(b_i)
    l_t = -J_t   (g_t has the sign of A_t, so the base gate clips s_i in the direction that would improve J).
Inside both trust regions J_t = r_t A_t and the gradient is the plain importance-weighted policy gradient
r_t A_t d log pi(o_t) (the identity Jacobian on-policy). When the base gate is active the aggregate ratio stops
moving but the residual term still redistributes probability inside the response (its gradient sums to zero over
the response); when a fibre gate is active only that token's residual stops, while s_i (true gradient through all
tokens of the response: the Jacobian is block-diagonal over trajectories) keeps moving. eps_f -> inf gives a
GSPO-like sequence gate, eps_b -> inf a token-level gate on the residuals.
Differs from GRPO: two-scale trust region (trajectory aggregate + token residual) instead of one token clip.
Gaps filled: the gate form (PPO clip at each level, composed as above), the base aggregate (length-normalised mean,
as in GSPO), residuals clamped to +-20 in log space, and the defaults (GSPO's 3e-4 / 4e-4 for the base, GRPO's 0.2
for the fibre) are ours; the paper's higher levels (prompt group, domain: FiberPO-Domain) are not implemented.
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


@LOSSES.register("fiberpo", paper="Fibration Policy Optimization", arxiv="2603.08239", fidelity="reconstructed")
@dataclass(frozen=True)
class FiberPOLoss:
    """Trajectory-aggregate gate composed with a token-residual gate; arXiv:2603.08239 (reconstructed).

    Args:
        base_epsilon / base_epsilon_high: trust region of the trajectory ratio s_i = exp(mean_t l_t).
        fiber_epsilon / fiber_epsilon_high: trust region of the residual ratio v_t = r_t / s_i.
    """

    base_epsilon: float = hp(3e-4, ge=0, lt=1)
    base_epsilon_high: float = hp(4e-4, ge=0)
    fiber_epsilon: float = hp(0.2, ge=0, lt=1)
    fiber_epsilon_high: float = hp(0.2, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask, adv = batch.response_mask, batch.advantages
        lim = ops.LOG_RATIO_CLAMP
        log_r = ops.log_ratio(logprobs, batch.old_logprobs)
        base = ops.masked_mean(log_r, mask, dim=-1)  # (B,) with gradient through every token of the row
        resid = (log_r - base[:, None]).clamp(-lim, lim)
        s, v = base.exp()[:, None], resid.exp()
        fib = torch.maximum(-adv * v, -adv * v.clamp(1 - self.fiber_epsilon, 1 + self.fiber_epsilon_high))  # -g_t
        s_clip = s.clamp(1 - self.base_epsilon, 1 + self.base_epsilon_high)
        loss = torch.maximum(s * fib, s_clip * fib)  # -min(s g, s~ g)
        rows = mask.any(-1)
        base_gated = (s_clip * fib > s * fib) & mask
        fiber_gated = (-adv * v.clamp(1 - self.fiber_epsilon, 1 + self.fiber_epsilon_high) > -adv * v) & mask
        metrics = {
            "loss/base_gate_frac": ops.masked_mean(base_gated.any(-1).float(), rows).detach(),
            "loss/fiber_gate_frac": ops.masked_mean(fiber_gated.float(), mask).detach(),
            "loss/base_ratio_mean": ops.masked_mean(base.exp(), rows).detach(),
            "loss/ratio_mean": ops.masked_mean(log_r.exp(), mask).detach(),
        }
        return LossOut(ops.zero_outside(loss, mask), metrics)


PRESETS = {
    # FiberPO (arXiv:2603.08239, reconstructed): GRPO advantages, base gate 3e-4 / 4e-4 on the trajectory ratio,
    # fibre gate 0.2 on token residuals, per-response token mean (the (1/|o_i|) sum_t of the objective), no KL.
    "fiberpo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "fiberpo", "base_epsilon": 3e-4, "base_epsilon_high": 4e-4, "fiber_epsilon": 0.2,
                 "fiber_epsilon_high": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
