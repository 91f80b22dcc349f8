"""Clip-Cov and KL-Cov: entropy control by restricting the updates of high-covariance tokens.

Paper: Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models",
arXiv:2505.22617 (released code: PRIME-RL/Entropy-Mechanism-of-RL; verl ``compute_policy_loss_clip_cov`` /
``kl_cov``). Under a policy gradient the change of policy entropy is driven by the covariance between a token's
log-probability and its advantage, so a few tokens with a large centred product
    Cov_t = (log pi_t - mean log pi) * (A_t - mean A)      (means over the batch's trained tokens, Eq. 11)
cause the entropy collapse. The paper's two remedies (Sec. 5.2):
- Clip-Cov (Eq. 12): among the tokens with omega_low < Cov_t < omega_high, pick r * N at random (N = trained tokens,
  at least 1) and detach them: their loss and gradient are zero. The rest take the PPO clipped surrogate (tokens PPO
  already clips are not candidates).
- KL-Cov (Eq. 13): the top k = r * N tokens by Cov_t (at least 1) get a penalty beta |log pi_t - log pi_old_t| added
  to the unclipped surrogate -r_t A_t; every other token takes -r_t A_t (no clip).
Differs from GRPO: the trust region is replaced (KL-Cov) or supplemented (Clip-Cov) by a per-token rule aimed at the
entropy, not the ratio. Paper defaults: Clip-Cov r = 2e-4, omega in (1, 5); KL-Cov r = 2e-3 (7B; 2e-4 for 32B),
beta = 1.

Conventions: the covariance is taken over the tokens of one call (one micro-batch), as the released code and verl do.
Clip-Cov's random choice is made reproducible and independent of row order: each candidate gets a pseudo-random key
from its row's tokens, its position and ``seed``, and the r * N smallest keys are detached (verl draws a fresh
permutation; with r large enough to take every candidate both coincide: tests/unit/test_peer_parity.py).
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
from lmpo.methods.params import hp, ordered
from lmpo.registry import LOSSES

PAPER = "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"


def token_covariance(logprobs: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """Cov_t = (log pi_t - mean log pi)(A_t - mean A) over the trained tokens (Eq. 11), detached; 0 off the mask."""
    lp = logprobs.detach()
    cov = (lp - ops.masked_mean(lp, mask)) * (adv - ops.masked_mean(adv, mask))
    return ops.zero_outside(cov, mask)


def n_selected(ratio: float, mask: Tensor) -> int:
    return max(int(ratio * int(mask.sum())), 1)


@LOSSES.register("clip_cov", paper=PAPER + " (Clip-Cov)", arxiv="2505.22617")
@dataclass(frozen=True)
class ClipCovLoss:
    """PPO clip, plus r * N random tokens with omega_low < Cov < omega_high detached (Eq. 12, arXiv:2505.22617).

    Args:
        ratio: r, the fraction of trained tokens detached (at least one).
        cov_low / cov_high: the covariance window (omega_low, omega_high) of the candidates.
        epsilon / epsilon_high: the PPO clip range (epsilon_high ``None`` = epsilon).
        seed: seed of the reproducible random choice.
    """

    ratio: float = hp(2e-4, gt=0, le=1)
    cov_low: float = 1.0
    cov_high: float = 5.0
    epsilon: float = hp(0.2, ge=0)
    epsilon_high: float | None = hp(None, ge=0)
    seed: int = 0
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})
    constraints: ClassVar[tuple] = (ordered("cov_low", "cov_high"),)

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        adv = batch.advantages
        hi = self.epsilon if self.epsilon_high is None else self.epsilon_high
        ratio = ops.token_ratio(logprobs, batch.old_logprobs)
        loss, clipped = clipped_surrogate(ratio, adv, self.epsilon, hi, None)
        cov = token_covariance(logprobs, adv, mask)
        cand = mask & ~clipped & (cov > self.cov_low) & (cov < self.cov_high)
        # a reproducible pseudo-random key per token, equal for equal rows whatever their order
        row = ops.token_hash(batch.response_ids, mask, self.seed).double()
        pos = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float64)
        key = torch.frac(torch.sin(row[:, None] * 12.9898 + pos[None, :] * 78.233 + self.seed) * 43758.5453)
        key = torch.where(cand, key, torch.full_like(key, float("inf")))
        k = min(n_selected(self.ratio, mask), int(cand.sum()))
        drop = torch.zeros_like(mask)
        if k > 0:
            drop.view(-1)[key.view(-1).topk(k, largest=False).indices] = True
        keep = mask & ~drop
        metrics = {
            "loss/clip_frac": ops.masked_mean(clipped.float(), mask).detach(),
            "loss/cov_detached_frac": ops.masked_mean(drop.float(), mask).detach(),
            "loss/cov_mean": ops.masked_mean(cov, mask).detach(),
        }
        return LossOut(ops.zero_outside(loss, keep), metrics)


@LOSSES.register("kl_cov", paper=PAPER + " (KL-Cov)", arxiv="2505.22617")
@dataclass(frozen=True)
class KLCovLoss:
    """-r A on every token, + beta |log pi - log pi_old| on the top r * N tokens by Cov (Eq. 13, arXiv:2505.22617).

    Args:
        ratio: r, the fraction of trained tokens penalised (at least one).
        coef: beta, the weight of the |log-ratio| penalty.
    """

    ratio: float = hp(2e-3, gt=0, le=1)
    coef: float = hp(1.0, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        adv = batch.advantages
        logr = ops.log_ratio(logprobs, batch.old_logprobs)
        loss = -adv * logr.exp()
        cov = token_covariance(logprobs, adv, mask)
        k = min(n_selected(self.ratio, mask), int(mask.sum()))
        top = torch.zeros_like(mask)
        if k > 0:
            scores = torch.where(mask, cov, torch.full_like(cov, float("-inf")))
            top.view(-1)[scores.reshape(-1).topk(k).indices] = True
        loss = loss + self.coef * ops.zero_outside(logr, top).abs()
        metrics = {
            "loss/cov_penalised_frac": ops.masked_mean(top.float(), mask).detach(),
            "loss/cov_mean": ops.masked_mean(cov, mask).detach(),
            "loss/abs_log_ratio": ops.masked_mean(logr.abs(), mask).detach(),
        }
        return LossOut(ops.zero_outside(loss, mask), metrics)


PRESETS = {
    # Clip-Cov (arXiv:2505.22617 Sec. 5.2): GRPO advantages, PPO clip + covariance-window detaching, token mean.
    "clip_cov": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "clip_cov", "ratio": 2e-4, "cov_low": 1.0, "cov_high": 5.0},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
    # KL-Cov: the top-covariance tokens get a |log-ratio| penalty (beta = 1, r = 2e-3 as for the paper's 7B runs).
    "kl_cov": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "kl_cov", "ratio": 2e-3, "coef": 1.0},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
