"""Truncated / masked importance sampling (TIS / MIS) for the sampler-vs-trainer mismatch, on the PPO clip loss.

Source: Yao, Liu, Zhang, Dong, Shang, Gao 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
Training" (blog, fengyao.notion.site/off-policy-rl; no arXiv id), and verl's rollout importance-sampling options
(level token | sequence, mode truncate | mask, threshold). The rollout engine samples from pi_sampler (here
``batch.sampler_logprobs``) while the trainer differentiates pi_trainer; even with the same weights they differ
(kernels, precision, top-k/top-p), so "on-policy" training is off-policy. The blog corrects the PPO loss with a
detached weight on the trainer-vs-sampler ratio, capped at C (TIS, "truncated IS"):
    l_t = sg(w_t) * l^PPO_t(r_t),   rho_t = pi_old(o_t) / pi_sampler(o_t),   r_t = pi(o_t) / pi_old(o_t)
    truncate (TIS):  w_t = min(rho_t, C)          mask (MIS):  w_t = rho_t * 1[lower <= rho_t <= C]
where pi_old is the trainer before the update (the detached current log-probs when there is a single update, as the
loop does on-policy). ``level="sequence"`` uses one weight per response, rho = prod_t rho_t (exp of the summed
log-ratio over trained tokens), applied to all its tokens. l^PPO is ``clipped_surrogate`` of ``ppo_clip``; with
w = 1 (no mismatch) the loss is exactly ppo_clip.
Differs from GRPO: an extra detached correction for the rollout engine; the trust region is unchanged.
Gaps filled: C = 2 is the blog's default for token-level TIS; ``lower`` (mask mode only) defaults to no lower bound;
log-ratios are clamped to +-20 before exponentiation (sequence level: the summed log-ratio).
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
from lmpo.methods.params import Rule, hp, ordered, rule
from lmpo.registry import LOSSES


@LOSSES.register("ppo_clip_is", paper="On the Rollout-Training Mismatch in Modern RL Systems (TIS; Yao et al. 2025, "
                 "NeurIPS ER workshop, https://openreview.net/forum?id=8MHqvb4lK9)", arxiv="none")
@dataclass(frozen=True)
class PPOClipISLoss:
    """PPO clip loss times a detached truncated (TIS) or masked (MIS) trainer/sampler importance weight.

    Args:
        epsilon, epsilon_high, dual_clip: the PPO clip surrogate (as in ``ppo_clip``).
        level: ``token`` (one weight per token) or ``sequence`` (product over the response).
        mode: ``truncate`` (min(rho, cap)) or ``mask`` (rho, zeroed outside [lower, cap]).
        cap: the threshold C (> 0).
        lower: mask mode only: lower threshold (``None`` = none).
    """

    epsilon: float = hp(0.2, ge=0)
    epsilon_high: float | None = hp(None, ge=0)
    dual_clip: float | None = hp(None, gt=1)
    level: str = hp("token", choices=("token", "sequence"))
    mode: str = hp("truncate", choices=("truncate", "mask"))
    cap: float = hp(2.0, gt=0)
    lower: float | None = hp(None, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs", "sampler_logprobs"})
    constraints: ClassVar[tuple[Rule, ...]] = (
        ordered("lower", "cap", strict=True),
        rule(lambda lower, mode: lower is None or mode == "mask", '{lower} is only used with {mode}="mask"'),
    )

    def weights(self, old: Tensor, sampler: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(weight, raw rho, rejected-or-truncated indicator), all (B, T) and detached."""
        log_rho = ops.log_ratio(old.detach(), sampler.detach())
        if self.level == "sequence":
            seq = ops.masked_sum(log_rho, mask, -1).clamp(-ops.LOG_RATIO_CLAMP, ops.LOG_RATIO_CLAMP)
            log_rho = seq[:, None].expand_as(log_rho)
        rho = log_rho.exp()
        if self.mode == "truncate":
            return rho.clamp(max=self.cap), rho, rho > self.cap
        out = (rho > self.cap) | (rho < (self.lower if self.lower is not None else 0.0))
        return torch.where(out, torch.zeros_like(rho), rho), rho, out

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        ratio = ops.token_ratio(logprobs, batch.old_logprobs)
        ppo, clipped = clipped_surrogate(ratio, batch.advantages, self.epsilon, eps_high, self.dual_clip)
        w, rho, hit = self.weights(batch.old_logprobs, batch.sampler_logprobs, mask)
        loss = w * ppo
        metrics = {
            "loss/clip_frac": ops.masked_mean(clipped.float(), mask).detach(),
            "loss/ratio_mean": ops.masked_mean(ratio, mask).detach(),
            "loss/is_weight_mean": ops.masked_mean(w, mask),
            "loss/is_rho_mean": ops.masked_mean(rho, mask),
            "loss/is_hit_frac": ops.masked_mean(hit.float(), mask),
            "loss/mismatch_k3": ops.masked_mean(
                ops.kl_estimate(batch.sampler_logprobs.detach(), batch.old_logprobs.detach(), "k3"), mask),
        }
        return LossOut(ops.zero_outside(loss, mask), metrics)


_GRPO = {"advantage": {"name": "grpo"}, "aggregator": {"name": "seq_mean_token_mean"},
         "kl": {"beta": 0.04, "estimator": "k3", "mode": "loss"}}

PRESETS = {
    # TIS on top of GRPO (same advantage, clip 0.2, aggregation and KL as the grpo preset): token-level truncated
    # trainer/sampler weight with C = 2 (the blog's default).
    "tis": {**_GRPO, "loss": {"name": "ppo_clip_is", "epsilon": 0.2, "level": "token", "mode": "truncate", "cap": 2.0}},
    # MIS on top of GRPO: token-level masked IS (tokens with rho > C carry no loss), C = 2.
    "mis": {**_GRPO, "loss": {"name": "ppo_clip_is", "epsilon": 0.2, "level": "token", "mode": "mask", "cap": 2.0}},
}
