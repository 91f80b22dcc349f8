"""DisCO: Discriminative Constrained Optimization for large reasoning models.

Paper: Li, Lin, Galanti, Tu, Yang 2025 (NeurIPS 2025), "DisCO: Reinforcing Large Reasoning Models with
Discriminative Constrained Optimization", arXiv:2505.12366 (values as in the authors' released code,
Optimization-AI/DisCO).

Score of response o (the paper's non-clipping scoring functions):
    logL:    s(o) = (1/|o|) sum_t log pi(o_t)                 L-ratio: s(o) = (1/|o|) sum_t pi(o_t) / pi_old(o_t)
Per question q with positives O+ and negatives O- (questions with no positive or no negative are dropped):
    DisCO   J_q = mean_{O+} s - tau log sum_{O-} exp(s / tau)     (distributionally-robust log-sum-exp)
    DisCO-b J_q = mean_{O+} s - mean_{O-} s                        (balanced)
Trust region KL(pi_old || pi) <= delta via a squared-hinge penalty (the paper's constrained form):
    loss = -(1/N_q) sum_q J_q + beta sg(max(0, K - delta)) K,   K = token mean over the batch of
    k_t = r_t - 1 - log r_t, r = pi/pi_old, whose gradient is that of (beta/2) max(0, K - delta)^2.
K is the mean over every trained token of the call (the released code's masked mean over the micro-batch), so a long
response weighs more than a short one. Until issue 21 lmpo averaged per sequence and then over sequences, which
changes when the hinge fires: a 1-token row with k = 0.0103 next to a 99-token row with k = 0 gave K = 0.00514 and a
penalty coefficient 1e3 (K - 1e-4) = 5.04 where the official K = 1.03e-4 gives 0.0027. The paper does not define the
sequence-mean form, so it is not kept as an option.

Differs from GRPO: no advantage, no clip, no difficulty (p(1-p)) weighting of questions; the score gap between correct
and incorrect answers of a question is maximised directly, and stability comes from the KL hinge, not from a clip.

Per-token form: every trained token of row i carries -J_{q(i)} (a differentiable function of all scores of i's group)
plus beta h k_it L_i / L_bar (h the detached hinge, L_i the row's trained tokens, L_bar their mean over the call's
rows). With ``seq_mean_token_mean`` this is exactly the loss above for equal group sizes (the paper divides by the
number of distinct questions): (1/N) sum_i (1/L_i) sum_t beta h k_it L_i / L_bar = beta h sum_it k_it / sum_i L_i.
Gaps filled: labels are ``reward > threshold``; K is measured on the rows of the call, as the released code measures it
per micro-batch, and a question couples its rows -- keep each group within one micro-batch (see REAL). The code's
log-sum-exp term has value S/sg(S) (gradient only); we use the true value, which has the same gradient. The paper's
equation numbers could not be checked against a primary copy here; the forms follow the method card and released code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.loss.real import group_logsumexp
from lmpo.methods.params import hp
from lmpo.registry import LOSSES

SCORES = ("logl", "lratio")
VARIANTS = ("disco", "balanced")


def group_member_mean(v: Tensor, group_ids: Tensor, member: Tensor) -> Tensor:
    """Per-row mean of ``v`` over the members of the row's group (B,); 0 where the group has no member."""
    total = ops.group_sum(ops.zero_outside(v, member), group_ids)
    return total / ops.group_sum(member.to(v.dtype), group_ids).clamp_min(1.0)


@LOSSES.register("disco", arxiv="2505.12366",
                 paper="DisCO: Reinforcing Large Reasoning Models with Discriminative Constrained Optimization")
@dataclass(frozen=True)
class DisCOLoss:
    """-J_q (score gap of positives over negatives) + squared-hinge KL(pi_old||pi) penalty; arXiv:2505.12366.

    Args:
        score: "logl" (token-mean log-likelihood) or "lratio" (token-mean likelihood ratio to pi_old).
        variant: "disco" (log-sum-exp over negatives) or "balanced" (DisCO-b, mean over negatives).
        tau: log-sum-exp temperature (code: 10 for logL, 1 for L-ratio).
        delta / beta: KL budget and hinge penalty weight (code: 1e-4, 1e3).
        threshold: a response is positive when its reward > threshold.
    """

    score: str = hp("logl", choices=SCORES)
    variant: str = hp("disco", choices=VARIANTS)
    tau: float = hp(10.0, gt=0)
    delta: float = hp(1e-4, ge=0)
    beta: float = hp(1e3, ge=0)
    threshold: float = 0.5
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        log_r = ops.log_ratio(logprobs, batch.old_logprobs)
        if self.score == "logl":
            s = ops.masked_mean(ops.zero_outside(logprobs, mask), mask, dim=-1)
        else:
            s = ops.masked_mean(ops.zero_outside(log_r.exp(), mask), mask, dim=-1)
        member = mask.any(-1)
        pos = member & (batch.rewards > self.threshold)
        neg = member & ~(batch.rewards > self.threshold)
        pos_mean = group_member_mean(s, batch.group_ids, pos)
        if self.variant == "disco":
            lse, has_neg = group_logsumexp(s / self.tau, batch.group_ids, neg)
            neg_term = self.tau * lse
        else:
            neg_term = group_member_mean(s, batch.group_ids, neg)
            has_neg = ops.group_sum(neg.to(s.dtype), batch.group_ids) > 0
        has_pos = ops.group_sum(pos.to(s.dtype), batch.group_ids) > 0
        valid = member & has_pos & has_neg
        row = ops.zero_outside(neg_term - pos_mean, valid)  # -J_q on every row of a valid group
        # KL(pi_old || pi) estimate per token, r - 1 - log r >= 0; K = token mean over the call (released code)
        k = ops.zero_outside(torch.expm1(log_r) - log_r, mask)
        K = ops.masked_mean(k, mask).detach()
        hinge = self.beta * (K - self.delta).clamp_min(0.0)
        lengths = mask.sum(-1).to(k.dtype)  # L_i; weight L_i / L_bar turns the row-then-token mean into a token mean
        weight = lengths / ops.masked_mean(lengths, member).clamp_min(1.0)
        per_token = ops.zero_outside(row[:, None] + hinge * weight[:, None] * k, mask)
        metrics = {
            "loss/kl_old": K,
            "loss/kl_hinge": hinge,
            "loss/valid_frac": ops.masked_mean(valid.float(), member).detach(),
        }
        return LossOut(per_token, metrics)


_BASE = {"advantage": {"name": "grpo"}, "aggregator": {"name": "seq_mean_token_mean"}, "kl": {"beta": 0.0}}
PRESETS = {
    # DisCO (arXiv:2505.12366, released scripts): logL score, tau 10, delta 1e-4, beta 1e3, no reference KL.
    # The advantage stage is unused by this loss (rewards are labels).
    "disco": {**_BASE, "loss": {"name": "disco", "score": "logl", "variant": "disco", "tau": 10.0}},
    # DisCO-b: balanced score gap (mean over negatives).
    "disco_b": {**_BASE, "loss": {"name": "disco", "score": "logl", "variant": "balanced"}},
}
