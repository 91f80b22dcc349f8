"""GPG: Group Policy Gradient (group-centred advantage with the accurate-gradient-estimation scale).

Paper: Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning",
arXiv:2504.02546 (released code: AMAP-ML/GPG; verl ``compute_gpg_outcome_advantage``). The objective is the plain
policy gradient, no surrogate, no clip, no KL, no reference model:
    J = E[(1/sum_i |o_i|) sum_i sum_t A_i log pi(o_i,t)],   A_i = alpha (R_i - mean_g R) / F_norm,
with F_norm = 1 (the paper's default; it mentions normalising by the group std only above a threshold, which we do
not implement) and alpha the "accurate gradient estimation" (AGE) factor: groups whose rewards are all equal carry no
gradient, so the batch mean over B rows under-weights the informative ones; alpha = B / (B - M) with M the rows of
such groups rescales the batch mean to one over the informative rows.
Differs from GRPO: no std division, and one batch-level scale alpha instead. The loss is lmpo's ``reinforce``
(-A log pi) with token-mean aggregation (the paper's Eq. for J).

Gaps and conventions (tests/unit/test_peer_parity.py): verl computes alpha as B / (number of rows with a *nonzero
raw reward*) (``alpha="nonzero_reward"`` reproduces it), not from the all-equal groups; for 0/1 rewards the two differ
(verl counts correct answers). A singleton group gets A = 0 here (no baseline) and its raw reward in verl
(``singleton="raw"``). When no group is informative every advantage is 0 and the denominator is clamped at 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.advantage.grpo import broadcast, outcome_returns
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES


@ADVANTAGES.register("gpg", paper="GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning",
                     arxiv="2504.02546", fidelity="reconstructed")
@dataclass(frozen=True)
class GPGAdvantage:
    """A_i = alpha (R_i - mean_g R) / F_norm with alpha = B / (B - M) (AGE); arXiv:2504.02546.

    Args:
        alpha: "valid" (the paper's B / (B - M), M = rows of all-equal groups), "nonzero_reward" (verl: B / rows with
            a nonzero reward) or "none" (alpha = 1).
        f_norm: the constant F_norm dividing the advantage.
        singleton: a group of one gets 0 ("zero") or its raw return ("raw", verl).
    """

    alpha: str = hp("valid", choices=("valid", "nonzero_reward", "none"))
    f_norm: float = hp(1.0, gt=0)
    singleton: str = hp("zero", choices=("zero", "raw"))
    needs: ClassVar[frozenset[str]] = frozenset()

    def scale(self, r: Tensor, group_ids: Tensor) -> Tensor:
        B = float(r.numel())
        if self.alpha == "none":
            return torch.ones((), dtype=torch.float64)
        if self.alpha == "nonzero_reward":
            informative = (r != 0).double().sum()
        else:  # rows of groups with some spread (a singleton has none)
            informative = (ops.group_std(r, group_ids) > 0).double().sum()
        return B / informative.clamp_min(1.0)

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = outcome_returns(batch).double()
        centred = ops.group_centered(r, batch.group_ids)
        if self.singleton == "raw":
            centred = torch.where(ops.group_count(batch.group_ids, r.dtype) == 1, r, centred)
        adv = self.scale(r, batch.group_ids) * centred / self.f_norm
        return broadcast(adv, batch.response_mask)


PRESETS = {
    # GPG (arXiv:2504.02546): group-centred advantages with the AGE scale, plain policy gradient -A log pi averaged
    # over the batch's tokens, no KL and no reference model, one optimizer step per batch (on-policy).
    "gpg": {
        "advantage": {"name": "gpg"},
        "loss": {"name": "reinforce"},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
