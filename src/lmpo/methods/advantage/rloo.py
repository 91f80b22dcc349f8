"""RLOO: REINFORCE with a leave-one-out baseline.

Paper: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs", arXiv:2402.14740, Sec. 3.2 (Eq. 7, following Kool et al. 2019):
    A_i = R_i - 1/(k-1) * sum_{j != i} R_j
for k samples of the same prompt. Differs from GRPO: the baseline excludes the sample itself and there is no std
scaling, so A_i = k/(k-1) * (R_i - mean_j R_j) (an unbiased gradient estimate). A prompt with a single sample has
no baseline; we give it A = 0 (no learning signal) rather than the raw reward. verl's two RLOO functions disagree
here: ``compute_rloo_outcome_advantage`` passes the raw score through and ``compute_rloo_vectorized_outcome_advantage``
gives 0; ``singleton="raw"`` reproduces the former (tests/unit/test_peer_parity.py).
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


@ADVANTAGES.register("rloo", paper="Back to Basics: Revisiting REINFORCE Style Optimization (RLOO)", arxiv="2402.14740")
@dataclass(frozen=True)
class RLOOAdvantage:
    """Leave-one-out advantage A_i = R_i - mean_{j != i} R_j; arXiv:2402.14740 Eq. 7.

    Args:
        singleton: a group of one gets 0 ("zero") or its raw return ("raw", verl's ``compute_rloo_outcome_advantage``).
    """

    singleton: str = hp("zero", choices=("zero", "raw"))
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = outcome_returns(batch)
        n = ops.group_count(batch.group_ids, r.dtype)
        adv = ops.zero_outside((r.double() - ops.group_loo_mean(r.double(), batch.group_ids)).float(), n > 1)
        if self.singleton == "raw":
            adv = torch.where(n > 1, adv, r)
        return broadcast(adv, batch.response_mask)
