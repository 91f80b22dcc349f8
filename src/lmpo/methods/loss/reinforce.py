"""Plain REINFORCE (score-function) loss.

Papers: Williams 1992, "Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement
Learning" (Machine Learning 8, no arXiv), as used for LLMs by Ahmadian et al. 2024, "Back to Basics: Revisiting
REINFORCE Style Optimization for Learning from Human Feedback in LLMs", arXiv:2402.14740, Eq. 6:
    l_t = -A_t * log pi(o_t)
No ratio, no clipping, no old log-probs: valid on-policy (one update per batch). Differs from GRPO: no trust region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.registry import LOSSES


@LOSSES.register("reinforce", paper="REINFORCE (Williams 1992), revisited in Back to Basics", arxiv="2402.14740")
@dataclass(frozen=True)
class ReinforceLoss:
    """Score-function loss -A_t log pi(o_t); arXiv:2402.14740 Eq. 6."""

    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        loss = -batch.advantages * logprobs
        return LossOut(ops.zero_outside(loss, mask), {})
