"""OPMD policy loss as R3L trains with it: token mean of -A log pi, divided by (1 + tau).

Paper: "R^3L: Reflect-then-Retry Reinforcement Learning with Language-Guided Exploration, Pivotal Credit, and
Positive Amplification", arXiv:2601.03715; the loss is Trinity-RFT's ``opmd`` (online policy mirror descent), which
R3L's released code trains with:
  l_t = -A_t log pi_theta(o_t) / (1 + tau)
No ratio and no clipping: the mirror-descent regularisation towards the current policy appears only as the constant
1 / (1 + tau) (tau = 1 in every R3L config). Differs from GRPO: no trust region, no importance ratio; with tau = 0
it is plain REINFORCE (arXiv:2402.14740 Eq. 6).

Fidelity "exact" with respect to the released code (the ``opmd`` loss function, checked in the code index); the
token-mean aggregation is the aggregator's (``aggregator: token_mean``, the code's default ``loss_agg_mode``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.params import hp
from lmpo.registry import LOSSES


@LOSSES.register("opmd", paper="R^3L: Reflect-then-Retry Reinforcement Learning with Language-Guided Exploration, "
                 "Pivotal Credit, and Positive Amplification (OPMD loss)", arxiv="2601.03715", fidelity="exact")
@dataclass(frozen=True)
class OPMDLoss:
    """-A_t log pi(o_t) / (1 + tau) per trained token.

    Args:
        tau: the mirror-descent regularisation weight (R3L configs: 1).
    """

    tau: float = hp(1.0, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        loss = -batch.advantages * logprobs / (1.0 + self.tau)
        return LossOut(ops.zero_outside(loss, batch.response_mask), {})
