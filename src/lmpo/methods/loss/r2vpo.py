"""R2VPO: Ratio-Variance Regularized Policy Optimization (primal-dual, no clipping).

Paper: Luo, Han, Hu, Li, Hao 2026, "Ratio-Variance Regularized Policy Optimization for Efficient LLM Fine-tuning",
arXiv:2601.03320 (extended: arXiv:2605.26784).

Constrained problem (reconstructed; the exact estimator was not available to us):
    max_theta  E[r_t A_t]   s.t.   E[(r_t - 1)^2] <= delta,        r_t = pi(y_t) / pi_old(y_t)
Lagrangian L(theta, nu) = E[r_t A_t] - nu (E[(r_t - 1)^2] - delta); primal descent on
    l_t = -r_t A_t + nu (r_t - 1)^2                                  (per token; the constant nu delta is dropped)
and dual ascent   nu <- max(0, nu + eta_nu (E[(r - 1)^2] - delta))   once per optimizer step.

Differs from GRPO: no hard clip. A token with r = 1.5 and A > 0 keeps gradient (-A r + 2 nu (r - 1) r); the variance
penalty is a smooth brake on the whole ratio distribution whose strength nu is learnt. At r = 1 the penalty and its
gradient vanish, so the first update of a step is the unclipped policy gradient.

State and micro-batching (how the dual variable stays correct): ``nu`` lives in ``_state`` and is *read only* by
``__call__``; every call adds the detached sum of (r - 1)^2 over its trained tokens and their count to a pending
accumulator. The trainer calls ``after_optimizer_step()`` once after each optimizer step (lmpo.train.step), which
applies one dual-ascent step with the token mean over every micro-batch of that step and clears the accumulator.
So nu is constant within a step and any micro-batch split gives the same per-token loss and the same dual update.
``state_dict()`` / ``load_state_dict()`` carry nu (and the pending sums) through checkpoints.

Gaps filled (guessed, the paper's values were not found): delta = 0.01 (ratio std ~0.1, half of PPO's 0.2 clip band),
eta_nu = 10, nu_0 = 0; E over tokens (token mean, also the preset's aggregator); advantages from GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut, Stateful
from lmpo.methods.params import hp
from lmpo.registry import LOSSES


def _fresh(nu: float) -> dict[str, float]:
    return {"nu": float(nu), "pending_sq": 0.0, "pending_n": 0.0}


@LOSSES.register("r2vpo", paper="Ratio-Variance Regularized Policy Optimization for Efficient LLM Fine-tuning",
                 arxiv="2601.03320", fidelity="reconstructed")
@dataclass
class R2VPOLoss(Stateful):
    """l_t = -r_t A_t + nu (r_t - 1)^2 with nu updated by dual ascent once per optimizer step.

    Args:
        delta: the ratio-variance budget E[(r - 1)^2] <= delta.
        dual_lr: eta_nu, the dual-ascent step size.
        nu_init: the initial multiplier nu_0 (>= 0).
    """

    delta: float = hp(0.01, gt=0)
    dual_lr: float = hp(10.0, ge=0)
    nu_init: float = hp(0.0, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def initial_state(self) -> dict[str, Any]:
        return _fresh(self.nu_init)

    @property
    def nu(self) -> float:
        return self.state["nu"]

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        ratio = ops.token_ratio(logprobs, batch.old_logprobs)
        dev = ratio - 1.0
        loss = -batch.advantages * ratio + self.nu * dev * dev
        sq = ops.masked_sum(dev.detach() ** 2, mask)
        self.state["pending_sq"] += float(sq)
        self.state["pending_n"] += float(mask.sum())
        metrics = {
            "loss/ratio_var": ops.masked_mean(dev.detach() ** 2, mask),
            "loss/nu": torch.tensor(self.nu),
        }
        return LossOut(ops.zero_outside(loss, mask), metrics)

    def after_optimizer_step(self) -> None:
        """Dual ascent nu <- max(0, nu + eta (E[(r-1)^2] - delta)) over the step's trained tokens; clears them."""
        s = self.state
        if s["pending_n"] > 0:
            var = s["pending_sq"] / s["pending_n"]
            s["nu"] = max(0.0, s["nu"] + self.dual_lr * (var - self.delta))
        s["pending_sq"], s["pending_n"] = 0.0, 0.0


PRESETS = {
    # R2VPO (arXiv:2601.03320): GRPO advantages, no clip, ratio-variance penalty with a learnt multiplier, no KL.
    # delta / dual_lr are our guesses (see the module docstring).
    "r2vpo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "r2vpo", "delta": 0.01, "dual_lr": 10.0, "nu_init": 0.0},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
