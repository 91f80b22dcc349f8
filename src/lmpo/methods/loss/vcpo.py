"""VCPO: Variance-Controlled Policy Optimization for stale (asynchronous, off-policy) rollouts.

Paper: Huang, Zhang, Hu, Yang, Han 2026, "Stable Asynchrony: Variance-Controlled Off-Policy RL for LLMs",
arXiv:2602.17616; the forms and defaults below are the authors' released code (mit-han-lab/vcpo: the per-trajectory
update of the Megatron actor, ``compute_opob_baseline``, the ``vcpo_k=*`` scripts), which issue 21 checked lmpo against.

Sequence IS weight w_i = pi_old(y_i|x) / mu(y_i|x) (mu = the rollout engine's policy), truncated w'_i = min(w_i, c), c = 8
(the scripts' sequence-level rollout IS, threshold 8).
Loss (form "ppo", the released code): the PPO surrogate with clipping off (clip low 1, high 1e9, dual clip 1e9)
times the truncated weight, per token  l_t = -A_i sg(w'_i) pi(y_it) / pi_old(y_it), seq-mean-token-mean.
(i) ESS step scaling: ESS = (sum_i w_i)^2 / sum_i w_i^2 over the optimizer step's rows (unclipped weights),
    rho = ESS / B, lr_eff = lr * sqrt(min(1, rho / rho_base))   ("sqrt" rule for Adam-type optimisers; "linear" too).
(ii) Off-policy optimal baseline per prompt group (the code's ``grad_baselining``, scope "group"):
    b* = sum_i W_i R_i / sum_i W_i,   W_i = ||g_i||^2 w_i^2,   g_i = grad_theta sum_t sg(w'_i) pi(y_it) / pi_old(y_it)
    i.e. the true per-trajectory gradient of the unit-advantage loss (which carries w'_i) times the *unclipped* weight
    squared (= the group mean when weights and norms are equal);
    A_i = (R_i - b*) / (std_group(R) + eps) when ``norm_by_std`` (the code's scale), else R_i - b*.
Since the surrogate is linear in A, the code's update sum_i A_i g_i (accumulated trajectory by trajectory) is the
gradient of this per-token loss with A detached; only b* needs the per-trajectory gradients. ``grad_norm="exact"``
(default) computes them here: one extra backward per row (``torch.autograd.grad`` of each row's unit-advantage loss
w.r.t. the leaves of the log-probs' graph, i.e. the trainable parameters; retain_graph), the cost the released code
pays too. Without a graph (a call under no_grad) the "tokens" proxy is used.

Differs from GRPO: the baseline weights each sample by its squared IS weight and gradient norm (stale, unlikely
samples barely move it), the truncated IS weight multiplies an unclipped ratio, and the step size shrinks with the ESS.

How the step scaling reaches the optimizer: each call accumulates the detached sum w, sum w^2 and row count; the trainer
asks ``lr_scale()`` once before each optimizer step and calls ``after_optimizer_step()`` after it, which clears the sums
(lmpo.train.step). So the factor is computed on the whole mini-batch whatever the micro-batch split.

Options kept (issue 21 made the above the default): ``form="is_pg"`` is the paper's written estimator
g = (1/B) sum_i w'_i (R_i - b) grad log pi(y_i) with w = pi / mu (l_t = -sg(w'_i) A_i log pi(y_it); the same gradient as
"ppo" when pi = pi_old), which lmpo used before; ``grad_norm="tokens"`` (||grad sum_t log pi||^2 ~ |y_i|) and
``"equal"`` are lmpo's cheap stand-ins for the exact norms, not the paper's (lmpo's old default was "tokens"). A tensor
``batch.extras["grad_sq_norm"]`` (B,), ||grad sum_t log pi(y_it)||^2, if present, is used instead. The baseline
couples a group's rows: keep each group within one micro-batch. Outcome rewards only (no token rewards). The exact
norms are those of the loss as seq-mean-token-mean sums it per row (the code multiplies its norm by |y_i| to undo the
1/|y_i| of that mode), and over this call's rows: the code measures them in fp32 per data-parallel replica.
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

GRAD_NORMS = ("exact", "tokens", "equal")
FORMS = ("ppo", "is_pg")


def graph_leaves(t: Tensor) -> list[Tensor]:
    """The leaf tensors requiring grad that ``t`` depends on (the trainable parameters behind the log-probs)."""
    if t.grad_fn is None:
        return [t] if t.requires_grad else []
    seen, leaves, stack = set(), [], [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad: a leaf
            leaves.append(fn.variable)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return leaves


def row_grad_sq_norms(unit: Tensor, rows: Tensor) -> Tensor:
    """||grad unit_i||^2 (B,) float64 w.r.t. every leaf of the graph, one backward per row (graph retained)."""
    leaves = graph_leaves(unit)
    out = torch.zeros(unit.shape[0], dtype=torch.float64, device=unit.device)
    for i in rows.nonzero().flatten().tolist():
        grads = torch.autograd.grad(unit[i], leaves, retain_graph=True, allow_unused=True)
        out[i] = sum(float((g.double() ** 2).sum()) for g in grads if g is not None)
    return out


ESS_RULES = ("sqrt", "linear", "none")
BEHAVIOURS = ("sampler", "old")


@LOSSES.register("vcpo", paper="Stable Asynchrony: Variance-Controlled Off-Policy RL for LLMs", arxiv="2602.17616")
@dataclass
class VCPOLoss(Stateful):
    """-(R - b*) sg(min(w, c)) pi / pi_old with the ||g||^2 w^2-weighted baseline, plus ESS step scaling
    (arXiv:2602.17616, released code).

    Args:
        is_threshold: truncation c of the sequence IS weight in the loss (code: 8).
        ess_rule: "sqrt" (code default), "linear" or "none". ess_base: rho_base (code: 1).
        grad_norm: ||g_i||^2: "exact" (per-row backward, the code), or the stand-ins "tokens" (|y_i|) / "equal".
        form: "ppo" (unclipped ratio to pi_old times min(pi_old / mu, c), the code) or "is_pg"
            (sg(min(pi / mu, c)) log pi, the paper's written estimator).
        norm_by_std: divide R - b* by the group reward std (code: on). eps: added to the std.
        behaviour: "sampler" (mu = rollout engine log-probs) or "old" (pi_old).
    """

    is_threshold: float = hp(8.0, gt=0)
    ess_rule: str = hp("sqrt", choices=ESS_RULES)
    ess_base: float = hp(1.0, gt=0, le=1)
    grad_norm: str = hp("exact", choices=GRAD_NORMS)
    form: str = hp("ppo", choices=FORMS)
    norm_by_std: bool = True
    eps: float = hp(1e-6, ge=0)
    behaviour: str = hp("sampler", choices=BEHAVIOURS)

    def initial_state(self) -> dict[str, Any]:
        return dict(sum_w=0.0, sum_w2=0.0, rows=0.0)  # importance weights of the rows since the last optimizer step

    @property
    def needs(self) -> frozenset[str]:
        """pi_old's log-probs for the "ppo" form's ratio, or when they are the behaviour policy (``behaviour="old"``)."""
        return frozenset({"old_logprobs"}) if self.form == "ppo" or self.behaviour == "old" else frozenset()

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        member = mask.any(-1)
        mu = batch.sampler_logprobs if self.behaviour == "sampler" else batch.old_logprobs
        top = batch.old_logprobs if self.form == "ppo" else logprobs  # w = pi_old / mu (code) or pi / mu (is_pg)
        log_w = ops.masked_sum(top - mu, mask, dim=-1).detach()
        w = log_w.clamp(-ops.LOG_RATIO_CLAMP, ops.LOG_RATIO_CLAMP).double().exp()  # (B,) float64
        wt = w.clamp(max=self.is_threshold)
        if self.form == "ppo":  # unclipped ratio to pi_old (the code's PPO surrogate with clipping off)
            core = ops.log_ratio(logprobs, batch.old_logprobs).exp()
        else:
            core = logprobs
        unit = ops.zero_outside(-wt.to(logprobs.dtype)[:, None] * core, mask)  # the per-token loss at A = 1
        if "grad_sq_norm" in batch.extras:
            gsq = wt * wt * batch.extras["grad_sq_norm"].double()
        elif self.grad_norm == "exact" and unit.requires_grad:
            gsq = row_grad_sq_norms(unit.sum(-1), member).to(w.device)
        elif self.grad_norm in ("exact", "tokens"):
            gsq = wt * wt * mask.double().sum(-1)
        else:
            gsq = wt * wt
        lam = ops.zero_outside(gsq * (w * w if self.form == "ppo" else 1.0), member)
        r = batch.rewards.double()
        num, den = ops.group_sum(lam * r, batch.group_ids), ops.group_sum(lam, batch.group_ids)
        base = torch.where(den > 0, num / den.clamp_min(1e-300), ops.group_mean(r, batch.group_ids))
        adv = r - base
        if self.norm_by_std:
            adv = adv / (ops.group_std(r, batch.group_ids) + self.eps)
        per_token = ops.zero_outside(ops.zero_outside(adv, member).to(logprobs.dtype)[:, None] * unit, mask)
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
    # VCPO (arXiv:2602.17616, released scripts): sequence IS truncated at 8 times an unclipped ratio to pi_old,
    # sqrt ESS step scaling (base 1), group optimal baseline weighted by exact ||g_i||^2 w_i^2, std-scaled
    # advantages, seq-mean-token-mean, no clip, no KL.
    "vcpo": {
        "advantage": {"name": "grpo"},  # unused by the loss (it builds its own baseline)
        "loss": {"name": "vcpo", "is_threshold": 8.0, "ess_rule": "sqrt", "ess_base": 1.0, "form": "ppo",
                 "grad_norm": "exact"},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
