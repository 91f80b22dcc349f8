"""REAL: Rewards as Labels -- RLVR as multi-positive / multi-negative classification with an anchor logit.

Paper: Zhai, Chen, Zhao, Qian, Shen, Lu 2026, "Rewards as Labels: Revisiting RLVR from a Classification
Perspective", arXiv:2602.05630 (equations as in the authors' released code, Red-RL/REAL).

Score of rollout i: s_i = (1/|o_i|) sum_t [log pi(o_it) - log pi_old(o_it)] (token-mean log-ratio). For a prompt q with
positives O+ (reward 1) and negatives O- (reward 0):
    L_q = log(1 + sum_{i in O+} exp(-s_i / tau)) + log(1 + sum_{j in O-} exp(s_j / tau))
The "1 +" is the anchor logit 0: |dL_q/ds_k| = (1/tau) exp(-+s_k/tau) / (1 + sum ...) <= 1/tau, monotone in s_k, so a
low-probability positive gets *more* push than a likely one and no single negative can dominate.
Groups that are all-correct or all-wrong are dropped (L_q = 0). Variant "bce": per rollout
BCE(s_i / tau, label_i) = softplus(-+s_i / tau), the pointwise form (the paper's vanilla-BCE ablation), averaged over
the rollouts of valid groups only, as the released code does (issue 21: lmpo used to divide by every row, which
shrank the loss by the fraction of valid rows). In per-token form a valid row carries BCE_i N_rows / N_valid, so
``seq_mean_token_mean`` gives sum_{valid} BCE_i / N_valid; N_rows and N_valid are counted on the rows of the call
(the released code's micro-batch).

Differs from GRPO: no advantage, no ratio clip, no std; rewards are class labels and the loss is a softplus on a
length-normalised sequence score, coupled across the group.

Per-token form (the aggregator contract): every trained token of row i carries L_{q(i)}, a differentiable function of
all scores of i's group. With ``seq_mean_token_mean`` the loss is sum_q (n_q / N_rows) L_q, i.e. (1/#prompts) sum_q L_q
for equal group sizes -- the paper's normalisation by the number of distinct prompts -- and so is its gradient.
Gaps filled: labels are ``reward > threshold`` (0.5 for 0/1 rewards); a group's loss couples its rows, so a group must
lie within one micro-batch (num_minibatches = 1 and micro_batch_size a multiple of the group size, or none); rows
with no trained token are not group members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.params import hp
from lmpo.registry import LOSSES

VARIANTS = ("anchor", "bce")


def group_logsumexp(v: Tensor, group_ids: Tensor, member: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row log sum_{j in group(i), member j} exp(v_j) (B,) and whether that set is non-empty (B,); stable."""
    inv, n = ops.group_index(group_ids)
    m = torch.zeros(n, dtype=v.dtype, device=v.device).scatter_reduce(
        0, inv[member], v.detach()[member], "amax", include_self=False)
    shifted = ops.zero_outside(v - m[inv], member)  # <= 0 for members; 0 elsewhere (no inf reaches backward)
    e = ops.zero_outside(shifted.exp(), member)
    sums = torch.zeros(n, dtype=v.dtype, device=v.device).index_add(0, inv, e)
    has = torch.zeros(n, dtype=v.dtype, device=v.device).index_add(0, inv, member.to(v.dtype)) > 0
    lse = torch.where(has, sums, torch.ones_like(sums)).log() + m
    return lse[inv], has[inv]


def seq_score(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """s_i = token-mean log(pi / pi_old) over trained tokens (B,); no gradient into ``old_logprobs``."""
    diff = ops.zero_outside(logprobs - old_logprobs.detach(), mask)
    return ops.masked_mean(diff, mask, dim=-1)


@LOSSES.register("real", paper="Rewards as Labels: Revisiting RLVR from a Classification Perspective",
                 arxiv="2602.05630")
@dataclass(frozen=True)
class REALLoss:
    """Anchored multi-positive/multi-negative softplus loss on token-mean log-ratio scores (arXiv:2602.05630).

    Args:
        tau: temperature of the scores (released 1.5B/7B scripts and ms-swift: 0.5).
        variant: "anchor" (REAL) or "bce" (pointwise binary cross-entropy ablation).
        threshold: a rollout is a positive when its reward > threshold.
    """

    tau: float = hp(0.5, gt=0)
    variant: str = hp("anchor", choices=VARIANTS)
    threshold: float = 0.5
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        s = seq_score(logprobs, batch.old_logprobs, mask) / self.tau
        member = mask.any(-1)
        pos = member & (batch.rewards > self.threshold)
        neg = member & ~(batch.rewards > self.threshold)
        _, has_pos = group_logsumexp(s, batch.group_ids, pos)
        _, has_neg = group_logsumexp(s, batch.group_ids, neg)
        valid = has_pos & has_neg & member
        if self.variant == "anchor":
            lse_pos, _ = group_logsumexp(-s, batch.group_ids, pos)
            lse_neg, _ = group_logsumexp(s, batch.group_ids, neg)
            # log(1 + sum exp(x)) = softplus(logsumexp(x)); an empty set contributes log(1 + 0) = 0
            row = ops.zero_outside(F.softplus(lse_pos), has_pos) + ops.zero_outside(F.softplus(lse_neg), has_neg)
        else:  # mean over the rollouts of valid groups (released code): rescale by N_rows / N_valid
            n_valid = valid.sum().clamp_min(1).to(s.dtype)
            row = F.softplus(torch.where(pos, -s, s)) * (member.sum().to(s.dtype) / n_valid)
        row = ops.zero_outside(row, valid)
        per_token = ops.zero_outside(row[:, None].expand_as(logprobs), mask)
        metrics = {
            "loss/valid_frac": ops.masked_mean(valid.float(), member).detach(),
            "loss/score_pos": ops.masked_mean(s.detach() * self.tau, pos),
            "loss/score_neg": ops.masked_mean(s.detach() * self.tau, neg),
        }
        return LossOut(per_token, metrics)


PRESETS = {
    # REAL (arXiv:2602.05630, released scripts): tau 0.5, no clip, no KL, no entropy bonus, loss per prompt.
    "real": {
        "advantage": {"name": "grpo"},  # unused by the loss (rewards are the labels)
        "loss": {"name": "real", "tau": 0.5, "variant": "anchor"},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
