"""OPO: On-Policy RL with the Optimal reward baseline (length-weighted group baseline).

Paper: Hao et al. 2025, "On-Policy RL with Optimal Reward Baseline", arXiv:2505.23585 (verl
``compute_opo_outcome_advantage``). The variance-minimising baseline of the policy gradient is
    b* = E[||grad log pi(y)||^2 R(y)] / E[||grad log pi(y)||^2];
assuming per-token gradients orthogonal and of similar norm, ||grad log pi(y)||^2 is proportional to the length l_y,
so within a prompt's group
    b = sum_j l_j R_j / sum_j l_j,      A_i = R_i - b,
the same for every token of response i. Differs from GRPO: the baseline is length-weighted and there is no std
division; the paper trains strictly on-policy (one optimizer step per batch, ``train.epochs=1`` and one
mini-batch), so the clipped surrogate is the plain policy gradient.

Conventions: l_y counts the trained tokens of the response (``response_mask``). A group of one has b = R and A = 0
here; verl gives it b = 0 (A = R): ``singleton="raw"`` reproduces verl (tests/unit/test_peer_parity.py).
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


@ADVANTAGES.register("opo", paper="On-Policy RL with Optimal Reward Baseline", arxiv="2505.23585")
@dataclass(frozen=True)
class OPOAdvantage:
    """A_i = R_i - sum_j l_j R_j / sum_j l_j over the prompt's group (arXiv:2505.23585, optimal baseline).

    Args:
        singleton: a group of one gets 0 ("zero") or its raw return ("raw", verl).
    """

    singleton: str = hp("zero", choices=("zero", "raw"))
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = outcome_returns(batch).double()
        length = ops.response_lengths(batch.response_mask).double()
        num = ops.group_sum(length * r, batch.group_ids)
        den = ops.group_sum(length, batch.group_ids)
        # a group whose rows train no token has no weights: fall back to the plain mean (its tokens are masked anyway)
        base = torch.where(den > 0, num / den.clamp_min(1e-30), ops.group_mean(r, batch.group_ids))
        adv = r - base
        if self.singleton == "raw":
            adv = torch.where(ops.group_count(batch.group_ids, r.dtype) == 1, r, adv)
        return broadcast(adv, batch.response_mask)


PRESETS = {
    # OPO (arXiv:2505.23585): length-weighted optimal baseline, exact on-policy training (one optimizer step per
    # batch), token-mean policy gradient, no KL and no entropy bonus.
    "opo": {
        "advantage": {"name": "opo"},
        "loss": {"name": "ppo_clip"},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
        "train": {"ppo_epochs": 1, "num_minibatches": 1},
    },
}
