"""Filtered behaviour cloning: maximum likelihood on the good samples only -- the "no negative gradient" arm of the
on-policy / negative-gradient study.

Tajwar, Singh, Sharma, Rafailov, Schneider, Xie, Ermon, Finn, Kumar 2024, "Preference Fine-Tuning of LLMs Should
Leverage Suboptimal, On-Policy Data", arXiv:2404.14367 (ICML 2024). The paper sorts preference fine-tuning methods
along two axes: on-policy sampling vs offline data, and whether the objective carries a *negative gradient* that
pushes down the likelihood of bad responses (DPO, IPO, PPO / REINFORCE with a baseline) or only raises the
likelihood of good ones (Pref-FT, RWR, filtered BC / iterated best-of-N), Sec. 4-5. Filtered BC is the
mode-covering maximum likelihood on the kept samples, ``max sum_{i: r_i > threshold} log pi(y_i|x)``: with the
``reinforce`` loss (``-A_t log pi``) this advantage gives it, ``A_i = 1[r_i > threshold]`` on every trained token
(never negative, so no sample is pushed down).

On-policy (fresh samples each step) it is iterated best-of-N / RAFT; on a fixed batch reused for many epochs
(``train.ppo_epochs``) it is offline SFT on the data set's good responses. ``docs/preference-online.md`` has the
recipe that runs the paper's 2 x 2 comparison (on-policy vs offline x negative gradient vs none) on the copy task.
R is the outcome reward plus the summed token rewards when present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo.batch import RolloutBatch
from lmpo.methods.advantage.grpo import broadcast, outcome_returns
from lmpo.registry import ADVANTAGES


@ADVANTAGES.register("filtered_bc", paper="Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data "
                     "(filtered BC, the no-negative-gradient baseline)", arxiv="2404.14367")
@dataclass(frozen=True)
class FilteredBC:
    """A_i = 1 when the reward exceeds ``threshold``, else 0: likelihood on good samples, no negative gradient.

    Args:
        threshold: a sample is kept when its reward is above it (0.5 for 0/1 rewards).
    """

    threshold: float = 0.5
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        keep = (outcome_returns(batch) > self.threshold).to(torch.float32)
        return broadcast(keep, batch.response_mask)


PRESETS = {
    # Filtered BC on the policy's own samples (iterated best-of-N; arXiv:2404.14367's no-negative-gradient arm).
    "filtered_bc": {
        "advantage": {"name": "filtered_bc", "threshold": 0.5},
        "loss": {"name": "reinforce"},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
