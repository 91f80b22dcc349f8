"""BAPO: Balanced Policy Optimization with Adaptive Clipping.

Paper: Xi et al. 2025, "BAPO: Stabilizing Off-Policy Reinforcement Learning for LLMs via Balanced Policy
Optimization with Adaptive Clipping", arXiv:2510.18927 (official code: WooooDyy/BAPO, verl recipe ``bapo``).
Loss: PPO's clipped surrogate with *absolute* bounds, l_t = -min(r_t A_t, clip(r_t, c_low, c_high) A_t), plus the
dual clip (c = 3) for A < 0, token-mean aggregation. The bounds are re-chosen for every batch: start at
(c_low, c_high) = (a-, a+) and, while the positive share rho < rho0, raise c_low by delta1 up to b- (dropping the
gradient of more low-ratio negative tokens), then c_high by delta2 up to b+ (admitting more high-ratio positive
tokens). The positive share is measured on the tokens that still carry gradient (the paper's mechanism):
    rho = sum_{A>0, r<=c_high} r A / ( sum_{A>0, r<=c_high} r A + sum_{A<0, r>=c_low} r |A| ).
Paper vs code: the released verl recipe instead counts every token at its clamped value (min(r, c_high) A for
A > 0, max(r, c_low) |A| for A < 0), which makes rho fall as c_low rises, i.e. the search can only fail towards
(b-, b+). We implement the paper's gradient-bearing share by default because it is the quantity the paper's
argument is about (raising c_low is meant to *remove* negative contributions) and the card's worked example
reaches its target with it; ``contribution="clamped"`` reproduces the released code for comparison.
Differs from GRPO: clip bounds adapt per batch to keep positive-advantage tokens >= rho0 of the clipped objective.
Gaps filled: the bounds are searched over the tensors the loss receives (the trainer's micro-batch; the paper
all-reduces over data-parallel ranks, so use no micro-batching to search over the whole mini-batch); they restart
from (a-, a+) every batch, so the loss keeps no state between steps; rows/tokens with A = 0 count on neither side;
a batch with no gradient-bearing token keeps the start bounds. Defaults (released config): rho0 = 0.5,
c_low in [0.6, 0.9], c_high in [1.2, 3.0], steps 0.05, dual clip 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.loss.ppo_clip import clipped_surrogate
from lmpo.methods.params import Rule, hp, ordered
from lmpo.registry import LOSSES


@LOSSES.register("bapo", paper="BAPO: Balanced Policy Optimization with Adaptive Clipping", arxiv="2510.18927")
@dataclass(frozen=True)
class BAPOLoss:
    """Clipped surrogate whose absolute clip bounds are searched per batch for a positive share >= rho0."""

    target: float = hp(0.5, gt=0, lt=1)
    low_start: float = hp(0.6, gt=0, le=1)
    low_max: float = hp(0.9, gt=0, le=1)
    high_start: float = hp(1.2, ge=1)
    high_max: float = hp(3.0, ge=1)
    low_step: float = hp(0.05, gt=0)
    high_step: float = hp(0.05, gt=0)
    dual_clip: float | None = hp(3.0, gt=1)
    contribution: str = hp("gradient", choices=("gradient", "clamped"))
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})
    constraints: ClassVar[tuple[Rule, ...]] = (ordered("low_start", "low_max"), ordered("high_start", "high_max"),)

    def candidates(self) -> list[tuple[float, float]]:
        """The search path: c_low rises first, then c_high (integer step counts avoid float drift)."""
        n_low = math.floor((self.low_max - self.low_start) / self.low_step + 1e-9)
        n_high = math.floor((self.high_max - self.high_start) / self.high_step + 1e-9)
        path = [(self.low_start + i * self.low_step, self.high_start) for i in range(n_low + 1)]
        return path + [(path[-1][0], self.high_start + j * self.high_step) for j in range(1, n_high + 1)]

    def positive_share(self, ratio: Tensor, adv: Tensor, mask: Tensor, lows: Tensor, highs: Tensor) -> Tensor:
        """rho for each candidate (lows, highs: (K,)) -> (K,); 1 where no token carries a contribution."""
        r, a = ratio.detach()[None], adv[None]
        pos_tok, neg_tok = (mask & (adv > 0))[None], (mask & (adv < 0))[None]
        lo, hi = lows[:, None, None], highs[:, None, None]
        if self.contribution == "gradient":
            pos = ops.zero_outside(r * a, pos_tok & (r <= hi)).sum((1, 2))
            neg = ops.zero_outside(-r * a, neg_tok & (r >= lo)).sum((1, 2))
        else:
            pos = ops.zero_outside(torch.minimum(r, hi) * a, pos_tok).sum((1, 2))
            neg = ops.zero_outside(-torch.maximum(r, lo) * a, neg_tok).sum((1, 2))
        total = pos + neg
        return torch.where(total > 0, pos / total.clamp_min(1e-30), torch.ones_like(total))

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask, adv = batch.response_mask, batch.advantages
        ratio = ops.token_ratio(logprobs, batch.old_logprobs)
        path = torch.tensor(self.candidates(), dtype=ratio.dtype, device=ratio.device)  # (K, 2)
        share = self.positive_share(ratio, adv, mask, path[:, 0], path[:, 1])
        ok = share >= self.target
        idx = torch.where(ok.any(), ok.to(torch.int64).argmax(), torch.tensor(len(path) - 1, device=ok.device))
        c_low, c_high = path[idx, 0], path[idx, 1]
        loss, clipped = clipped_surrogate(ratio, adv, 1.0 - c_low, c_high - 1.0, self.dual_clip)
        metrics = {
            "loss/clip_low": c_low.detach(),
            "loss/clip_high": c_high.detach(),
            "loss/positive_share": share[idx].detach(),
            "loss/clip_frac": ops.masked_mean(clipped.float(), mask).detach(),
            "loss/ratio_mean": ops.masked_mean(ratio, mask).detach(),
        }
        return LossOut(ops.zero_outside(loss, mask), metrics)


PRESETS = {
    # BAPO (arXiv:2510.18927, released config): GRPO advantages, adaptive bounds c_low in [0.6, 0.9] and c_high in
    # [1.2, 3.0] (steps 0.05) for a positive share >= 0.5, dual clip 3, token-mean aggregation, no KL.
    "bapo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "bapo", "target": 0.5, "low_start": 0.6, "low_max": 0.9, "high_start": 1.2,
                 "high_max": 3.0, "low_step": 0.05, "high_step": 0.05, "dual_clip": 3.0},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
