"""DRPO: Decoupled Reward Policy Optimization for efficient reasoning.

Paper: Li et al. 2025, "DRPO: Efficient Reasoning via Decoupled Reward Policy Optimization", arXiv:2510.04474
(ICLR 2026; released code Optimization-AI/DRPO, ``compute_policy_loss_drpo``).

Adding a length penalty to the reward and group-normalising (GRPO) can give a correct but long answer a negative
advantage. DRPO builds on the discriminative objective of DisCO and lets the length preference act only *inside the
set of correct answers*, through the weights of the KL-regularised optimal positive distribution
P*(o) ~ pi_old(o) exp(r_len(o) / lambda). Per prompt q with correct set O+ and incorrect set O-:

    s_theta(o) = (1/|o|) sum_t log pi_theta(o_t | q, o_<t)                      (length-normalised score)
    r_len(o)   = 1 - |o| / L_max,   wbar(o) = exp(r_len(o)/lambda) / sum_{o' in O+} exp(r_len(o')/lambda)
    J_q(theta) = sum_{o in O+} wbar(o) s_theta(o) - tau log sum_{o' in O-} exp(s_theta(o') / tau)
    loss       = -(1/|Q|) sum_q J_q  (+ a KL trust region);  groups with O+ or O- empty contribute 0.

Its gradient is dJ_q/ds(o) = wbar(o) on correct answers and -softmax_{O-}(s/tau)(o) on wrong ones. This component
returns exactly those per-sequence coefficients as the advantage (evaluated at the sampling policy, i.e. theta_old
for one on-policy update): with a per-sequence token-mean aggregator (the 1/|o| of s_theta) the policy-gradient
loss -A_o log pi(o_t) then has the gradient of -J (up to the constant G between 1/|Q| and 1/B).
Correct answers always get A >= 0, wrong ones A <= 0, and each mixed group's advantages sum to 1 - 1 = 0.

Differences from GRPO: no group mean/std; a correct answer is never pushed down for being long (length only moves
weight among the correct answers), and wrong answers are weighted by a softmax of their scores (hard negatives).

Gaps filled (ours):
- s_theta at theta_old is read from ``sampler_logprobs`` (the trainer drops ``old_logprobs`` on-policy); with several
  PPO epochs the coefficients stay those of theta_old.
- Trust region: DRPO uses a KL penalty sg[max(beta (K - delta), 0)] K on the mean token KL K to pi_old, which needs
  the whole mini-batch inside the loss; the preset uses the PPO clip as the trust region instead.
- Correctness is R > ``reward_threshold`` (0.5 for 0/1 verifiers); L_max is the generation budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES


def group_softmax(logits: Tensor, keep: Tensor, group_ids: Tensor) -> Tensor:
    """Softmax of ``logits`` over the kept rows of each group (B,); 0 on rows not kept."""
    inv, n = ops.group_index(group_ids)
    x = torch.where(keep, logits, torch.full_like(logits, float("-inf")))
    mx = torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device).scatter_reduce(0, inv, x, reduce="amax")
    shift = ops.zero_outside(mx, torch.isfinite(mx))[inv]
    e = ops.zero_outside(torch.exp(ops.zero_outside(logits - shift, keep)), keep)
    z = torch.zeros(n, dtype=e.dtype, device=e.device).index_add(0, inv, e)[inv]
    return e / torch.where(z > 0, z, torch.ones_like(z))


@ADVANTAGES.register("drpo", paper="DRPO: Efficient Reasoning via Decoupled Reward Policy Optimization",
                     arxiv="2510.04474")
@dataclass(frozen=True)
class DRPOAdvantage:
    """Per-sequence gradient coefficients of DRPO's decoupled objective J_q (arXiv:2510.04474).

    Args:
        tau: temperature of the log-sum-exp over wrong answers (10).
        lam: lambda, temperature of the length weights among correct answers (0.1, ``tau2`` in the code).
        horizon: L_max; ``None`` uses ``rollout.max_new_tokens``.
        reward_threshold: a response is correct when R > this.
    """

    tau: float = hp(10.0, gt=0)
    lam: float = hp(0.1, gt=0)
    horizon: int | None = hp(None, ge=1)
    reward_threshold: float = 0.5
    needs: ClassVar[frozenset[str]] = frozenset({"sampler_logprobs"})

    def __call__(self, batch: RolloutBatch) -> Tensor:
        if self.horizon is None:
            raise ConfigError("advantage drpo needs horizon (L_max); the trainer fills it from rollout.max_new_tokens.")
        mask = batch.response_mask
        dtype = batch.sampler_logprobs.dtype
        correct = batch.rewards > self.reward_threshold
        n_pos = ops.group_sum(correct.to(dtype), batch.group_ids)
        n_neg = ops.group_count(batch.group_ids, dtype) - n_pos
        mixed = (n_pos > 0) & (n_neg > 0)
        lengths = ops.response_lengths(mask).to(dtype)
        r_len = 1.0 - lengths / float(self.horizon)
        w_pos = group_softmax(r_len / self.lam, correct, batch.group_ids)
        score = ops.masked_mean(batch.sampler_logprobs.detach(), mask, dim=-1)  # s_theta_old(o)
        w_neg = group_softmax(score / self.tau, ~correct, batch.group_ids)
        adv = ops.zero_outside(torch.where(correct, w_pos, -w_neg), mixed)
        return ops.zero_outside(adv[:, None], mask)


# 1.5B script: tau = 10, lambda = 0.1, G = 8, one PPO epoch, no reference KL, no entropy bonus. The per-sequence token
# mean gives s_theta's 1/|o|; the PPO clip stands in for DRPO's KL trust region (see the docstring).
PRESETS = {
    "drpo": {
        "advantage": {"name": "drpo", "tau": 10.0, "lam": 0.1},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
