"""EPO: entropy-regularised policy optimisation for multi-turn LLM agents (entropy bonus + entropy-band smoothing).

Paper: Xu et al. 2025, "EPO: Entropy-regularized Policy Optimization for LLM Agents Reinforcement Learning",
arXiv:2509.22576 (official code WujiangXu/EPO).

Per token t of trajectory i in turn k(i, t), with H_t the entropy of the current policy (with gradient):
  Eq. 5-6 (band): Hbar_k = cumulative mean of the turn-k token entropies of all *previous* iterations; a token is in
      band iff kappa_l * Hbar_k <= H_t <= kappa_r * Hbar_k.
  Objective (the released code's form of the paper's L = L_PG - lambda_H [H - beta_k alpha L_smooth]):
      l_t = ppo_t - lambda_H * H_t + lambda_H * c_smooth * w(n) * P_t
  with ppo_t the clipped surrogate of PPO/GRPO (arXiv:1707.06347 Eq. 7) and w(n) the phase weight of the code after
  n optimizer steps (E = ``schedule_iters``): w = 1 - 0.2 (1 - exp(-2 n / (E/2))) for n < E/2, then
  0.8 exp(-3 (n - E/2) / (E/2)); ``schedule_iters=0`` keeps w = 1.

DIFFERENTIABLE PENALTY (our change, stated on purpose): the paper's and the released code's P_t is a constant
alpha * 1[H_t outside the band] (built with torch.where), so it has zero gradient almost everywhere and only shifts
the loss value. We use the hinge P_t = alpha * (relu(kappa_l Hbar_k - H_t) + relu(H_t - kappa_r Hbar_k)): zero and
gradient-free inside the band, and outside it pushes H_t back toward the band with slope alpha.

Differs from GRPO: an entropy bonus on every trained token and a penalty on tokens whose entropy leaves the band
around the running per-turn average; with kappa_l = 0 and kappa_r = inf it is GRPO/PPO with an entropy bonus.

Gaps filled (fidelity "reconstructed"): the hinge form above; an "iteration" of the history is one optimizer step
(the pending per-turn sums of a step are committed by ``after_optimizer_step``), so Hbar never includes the batch
being optimised; a turn with no history yet gets no penalty; without ``turn_ids`` (single-turn text) every token is
turn 0 (on ``rollout.mode: episodes`` batches ``turn_ids`` number the policy turns, so Hbar_k is the history of
turn k's policy tokens; observation tokens share the turn id but are off ``response_mask`` and never recorded or
penalised); the code smooths only turns >= max_steps // 2, exposed as ``smooth_min_turn`` (default 0 = all turns).
Called without ``extras["current_entropy"]`` (outside the trainer) the entropy terms are 0. The trainer supplies
that entropy from the training forward itself because ``needs`` lists "current_entropy".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut, Stateful
from lmpo.methods.loss.ppo_clip import clipped_surrogate
from lmpo.methods.params import Rule, hp, ordered
from lmpo.registry import LOSSES


def phase_weight(n: int, total: int) -> float:
    """The released code's smoothing-weight schedule w(n) over ``total`` iterations (1 when total == 0)."""
    if total <= 0:
        return 1.0
    half = total / 2
    if n < half:
        return 1.0 - 0.2 * (1.0 - math.exp(-2.0 * n / half))
    return 0.8 * math.exp(-3.0 * min(1.0, (n - half) / half))


@LOSSES.register("epo", paper="EPO: Entropy-regularized Policy Optimization for LLM Agents Reinforcement Learning",
                 arxiv="2509.22576", fidelity="reconstructed")
@dataclass
class EPOLoss(Stateful):
    """Clipped surrogate + entropy bonus + differentiable entropy-band penalty against the per-turn history.

    Args:
        epsilon / epsilon_high: clip range of the surrogate (``epsilon_high=None`` = symmetric).
        entropy_coef: lambda_H (code default 0.001). smooth_coef: c_smooth (code default 1.0).
        kappa_low / kappa_high: band around the historical mean (README runs: 0 and 2).
        out_penalty: alpha, the penalty slope outside the band (README: 0.05 ScienceWorld, 0.1 ALFWorld).
        schedule_iters: E of the phase weight (code: 150); 0 = constant weight 1.
        smooth_min_turn: smooth only turns with index >= this.
    """

    epsilon: float = hp(0.2, ge=0)
    epsilon_high: float | None = hp(None, ge=0)
    entropy_coef: float = hp(0.001, ge=0)
    smooth_coef: float = hp(1.0, ge=0)
    kappa_low: float = hp(0.0, ge=0)
    kappa_high: float = 2.0
    out_penalty: float = hp(0.05, ge=0)
    schedule_iters: int = hp(150, ge=0)
    smooth_min_turn: int = hp(0, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs", "current_entropy"})
    constraints: ClassVar[tuple[Rule, ...]] = (ordered("kappa_low", "kappa_high", strict=True),)

    def initial_state(self) -> dict[str, Any]:
        return {"sum": {}, "count": {}, "pending": {}, "iters": 0}


    def history_mean(self, turns: Tensor) -> tuple[Tensor, Tensor]:
        """(Hbar per token, known per token) from the committed history."""
        hbar = torch.zeros(turns.shape, dtype=torch.float64, device=turns.device)
        known = torch.zeros(turns.shape, dtype=torch.bool, device=turns.device)
        for k, s in self.state["sum"].items():
            at = turns == k
            hbar = torch.where(at, s / self.state["count"][k], hbar)
            known |= at
        return hbar, known

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        mask = batch.response_mask
        ratio = ops.token_ratio(logprobs, batch.old_logprobs)
        loss, clipped = clipped_surrogate(ratio, batch.advantages, self.epsilon, eps_high, None)
        metrics = {"loss/clip_frac": ops.masked_mean(clipped.float(), mask).detach()}
        ent = batch.extras.get("current_entropy")
        if ent is not None:
            ent = ops.zero_outside(ent.to(loss.dtype), mask)
            turns = batch.turn_ids if batch.turn_ids is not None else torch.zeros_like(mask, dtype=torch.long)
            hbar, known = self.history_mean(turns)
            hbar = hbar.to(loss.dtype)
            upper = hbar * self.kappa_high if math.isfinite(self.kappa_high) else torch.full_like(hbar, math.inf)
            hinge = torch.relu(self.kappa_low * hbar - ent) + torch.relu(ent - upper)
            active = mask & known & (turns >= self.smooth_min_turn)
            penalty = ops.zero_outside(self.out_penalty * hinge, active)
            w = phase_weight(self.state["iters"], self.schedule_iters)
            loss = loss - self.entropy_coef * ent + self.entropy_coef * self.smooth_coef * w * penalty
            self._accumulate(ent.detach(), turns, mask)
            metrics["loss/epo_out_of_band"] = ops.masked_mean((active & (hinge > 0)).float(), mask).detach()
            metrics["loss/epo_penalty"] = ops.masked_mean(penalty, mask).detach()
        return LossOut(ops.zero_outside(loss, mask), metrics)

    def _accumulate(self, ent: Tensor, turns: Tensor, mask: Tensor) -> None:
        pend = self.state["pending"]
        for k in torch.unique(turns[mask]).tolist():
            at = mask & (turns == k)
            s, c = pend.get(k, (0.0, 0))
            pend[k] = (s + float(ent[at].double().sum()), c + int(at.sum()))

    def after_optimizer_step(self) -> None:
        """Commit this step's per-turn entropies into the cumulative history (one iteration)."""
        for k, (s, c) in self.state["pending"].items():
            self.state["sum"][k] = self.state["sum"].get(k, 0.0) + s
            self.state["count"][k] = self.state["count"].get(k, 0) + c
        self.state["pending"] = {}
        self.state["iters"] += 1




# Code defaults (entropy_coeff 0.001, smooth coeff 1.0) with the README band (0, 2) and the ScienceWorld penalty 0.05.
PRESETS = {
    "epo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "epo", "epsilon": 0.2, "entropy_coef": 0.001, "smooth_coef": 1.0, "kappa_low": 0.0,
                 "kappa_high": 2.0, "out_penalty": 0.05},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
