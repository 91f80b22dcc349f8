"""VCPO: Variance-Controlled Policy Optimization for stale (asynchronous, off-policy) rollouts.

Paper: Huang, Zhang, Hu, Yang, Han 2026, "Stable Asynchrony: Variance-Controlled Off-Policy RL for LLMs",
arXiv:2602.17616 (defaults from the released scripts, mit-han-lab/vcpo).

Sequence IS weight w_i = pi(y_i|x) / mu(y_i|x) (mu = the rollout engine's policy), truncated w'_i = min(w_i, c), c = 8.
(i) ESS step scaling: ESS = (sum_i w_i)^2 / sum_i w_i^2 over the optimizer step's rows (unclipped weights),
    rho = ESS / B, lr_eff = lr * sqrt(min(1, rho / rho_base))   ("sqrt" rule for Adam-type optimisers; "linear" too).
(ii) Off-policy optimal baseline per prompt group, minimising the variance of g = (1/B) sum_i w'_i (R_i - b) g_i:
    b* = sum_i w'_i^2 ||g_i||^2 R_i / sum_i w'_i^2 ||g_i||^2        (= the group mean when weights and norms are equal)
    A_i = (R_i - b*) / (std_group(R) + eps) when ``norm_by_std`` (the code's GRPO-like scale), else R_i - b*.
Loss per token: l_t = -sg(w'_i) A_i log pi(y_it), aggregated seq-mean-token-mean; no clip, no KL.

Differs from GRPO: the baseline weights each sample by its squared IS weight (stale, unlikely samples barely move it),
the IS weight multiplies the score function instead of a clipped ratio, and the step size shrinks with the ESS.

How the step scaling reaches the optimizer: each call accumulates the detached sum w, sum w^2 and row count; the trainer
asks ``lr_scale()`` once before each optimizer step and calls ``after_optimizer_step()`` after it, which clears the sums
(lmpo.train.step). So the factor is computed on the whole mini-batch whatever the micro-batch split.

Gaps filled (reconstructed): per-sample gradient norms ||g_i||^2 need one backward per trajectory, which a loss cannot
do; ``grad_norm="tokens"`` approximates ||sum_t grad log pi(y_it)||^2 by |y_i| (nearly orthogonal token score vectors),
``"equal"`` assumes equal norms. A tensor ``batch.extras["grad_sq_norm"]`` (B,), if present, is used instead. The
baseline couples a group's rows: keep each group within one micro-batch. Outcome rewards only (no token rewards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut, Stateful
from lmpo.methods.params import hp
from lmpo.registry import LOSSES

GRAD_NORMS = ("tokens", "equal")
ESS_RULES = ("sqrt", "linear", "none")
BEHAVIOURS = ("sampler", "old")


@LOSSES.register("vcpo", paper="Stable Asynchrony: Variance-Controlled Off-Policy RL for LLMs", arxiv="2602.17616",
                 fidelity="reconstructed")
@dataclass
class VCPOLoss(Stateful):
    """-sg(min(w, c)) (R - b*) log pi with the w^2 ||g||^2-weighted baseline, plus ESS step scaling (arXiv:2602.17616).

    Args:
        is_threshold: truncation c of the sequence IS weight in the loss and baseline (code: 8).
        ess_rule: "sqrt" (code default), "linear" or "none". ess_base: rho_base (code: 1).
        grad_norm: ||g_i||^2 proxy, "tokens" (|y_i|) or "equal".
        norm_by_std: divide R - b* by the group reward std (code: on). eps: added to the std.
        behaviour: "sampler" (mu = rollout engine log-probs) or "old" (pi_old).
    """

    is_threshold: float = hp(8.0, gt=0)
    ess_rule: str = hp("sqrt", choices=ESS_RULES)
    ess_base: float = hp(1.0, gt=0, le=1)
    grad_norm: str = hp("tokens", choices=GRAD_NORMS)
    norm_by_std: bool = True
    eps: float = hp(1e-6, ge=0)
    behaviour: str = hp("sampler", choices=BEHAVIOURS)

    def initial_state(self) -> dict[str, Any]:
        return dict(sum_w=0.0, sum_w2=0.0, rows=0.0)  # importance weights of the rows since the last optimizer step

    @property
    def needs(self) -> frozenset[str]:
        """pi_old's log-probs only when they are the behaviour policy (``behaviour="old"``)."""
        return frozenset({"old_logprobs"}) if self.behaviour == "old" else frozenset()

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        member = mask.any(-1)
        mu = batch.sampler_logprobs if self.behaviour == "sampler" else batch.old_logprobs
        log_w = ops.masked_sum(logprobs - mu, mask, dim=-1).detach()
        w = log_w.clamp(-ops.LOG_RATIO_CLAMP, ops.LOG_RATIO_CLAMP).double().exp()  # (B,) float64
        wt = w.clamp(max=self.is_threshold)
        if "grad_sq_norm" in batch.extras:
            gsq = batch.extras["grad_sq_norm"].double()
        elif self.grad_norm == "tokens":
            gsq = mask.double().sum(-1)
        else:
            gsq = torch.ones_like(w)
        lam = ops.zero_outside(wt * wt * gsq, member)
        r = batch.rewards.double()
        num, den = ops.group_sum(lam * r, batch.group_ids), ops.group_sum(lam, batch.group_ids)
        base = torch.where(den > 0, num / den.clamp_min(1e-300), ops.group_mean(r, batch.group_ids))
        adv = r - base
        if self.norm_by_std:
            adv = adv / (ops.group_std(r, batch.group_ids) + self.eps)
        coef = ops.zero_outside(wt * adv, member).to(logprobs.dtype)
        lp = ops.zero_outside(logprobs, mask)
        per_token = ops.zero_outside(-coef[:, None] * lp, mask)
        wm = w[member]
        s = self.state
        s["sum_w"] += float(wm.sum())
        s["sum_w2"] += float((wm * wm).sum())
        s["rows"] += float(wm.numel())
        ess = wm.sum() ** 2 / (wm * wm).sum().clamp_min(1e-300) / max(wm.numel(), 1)
        metrics = {
            "loss/ess_frac": ess.float(),
            "loss/is_weight_mean": wm.mean().float() if wm.numel() else torch.ones(()),
            "loss/is_trunc_frac": (w[member] > self.is_threshold).float().mean() if wm.numel() else torch.zeros(()),
        }
        return LossOut(per_token, metrics)

    def lr_scale(self) -> float:
        """sqrt (or linear) of min(1, (ESS / B) / rho_base) over every row seen since the last optimizer step."""
        s = self.state
        if self.ess_rule == "none" or s["rows"] == 0 or s["sum_w2"] <= 0:
            return 1.0
        rho = min(1.0, s["sum_w"] ** 2 / s["sum_w2"] / s["rows"] / self.ess_base)
        return rho ** 0.5 if self.ess_rule == "sqrt" else rho

    def after_optimizer_step(self) -> None:
        self.state.update(sum_w=0.0, sum_w2=0.0, rows=0.0)


PRESETS = {
    # VCPO (arXiv:2602.17616, released scripts): sequence IS truncated at 8, sqrt ESS step scaling (base 1),
    # group optimal baseline with IS weights, std-scaled advantages, seq-mean-token-mean, no clip, no KL.
    "vcpo": {
        "advantage": {"name": "grpo"},  # unused by the loss (it builds its own baseline)
        "loss": {"name": "vcpo", "is_threshold": 8.0, "ess_rule": "sqrt", "ess_base": 1.0},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
