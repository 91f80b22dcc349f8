"""DRO: Direct Reward Optimisation, the policy-gradient term with a quadratic log-ratio penalty (per token).

Papers: Richemond et al. 2024, "Offline Regularised Reinforcement Learning for Large Language Models Alignment"
(DRO), arXiv:2405.19107, and its per-token use by Kimi Team 2025, "Kimi k1.5: Scaling Reinforcement Learning with
LLMs", arXiv:2501.12599 (Sec. 2.3.2: policy mirror descent with a squared log-ratio penalty). The surrogate
(maximised) is
    J = E_{y ~ pi_old}[ A log pi(y) - (beta / 2) (log pi(y) - log pi_old(y))^2 ],
so the per-token loss is l_t = -(A_t log pi_t - (beta/2) (log pi_t - log pi_old_t)^2) and its gradient is
-A_t + beta (log pi_t - log pi_old_t): the policy gradient, pulled back towards pi_old in proportion to how far the
token moved (a soft trust region that never zeroes a gradient, unlike the clip). verl's ``compute_policy_loss_dro``
is the same loss (tests/unit/test_peer_parity.py).
Differs from GRPO: no ratio and no clip, a quadratic penalty instead; valid off-policy (pi_old is the sampler).
Gap filled: neither paper gives a beta for this setting (Kimi's tau is tuned per run, verl requires it to be set);
we default to beta = 0.1, and the preset pairs it with Dr. GRPO's mean-centred advantage, as Kimi k1.5 uses the
mean-centred reward (R - mean) as its advantage.
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


@LOSSES.register("dro", paper="Offline Regularised RL for LLM Alignment (DRO); Kimi k1.5", arxiv="2405.19107",
                 fidelity="reconstructed")
@dataclass(frozen=True)
class DROLoss:
    """-(A log pi - beta/2 (log pi - log pi_old)^2) per token; arXiv:2405.19107, arXiv:2501.12599 Sec. 2.3.2.

    Args:
        beta: weight of the squared log-ratio penalty (> 0).
    """

    beta: float = hp(0.1, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        mask = batch.response_mask
        lp = ops.zero_outside(logprobs, mask)
        d = ops.zero_outside(logprobs - batch.old_logprobs.detach(), mask)
        loss = -(batch.advantages * lp - 0.5 * self.beta * d * d)
        metrics = {"loss/log_ratio_sq": ops.masked_mean(d * d, mask).detach()}
        return LossOut(ops.zero_outside(loss, mask), metrics)


PRESETS = {
    # DRO / Kimi k1.5-style mirror descent: mean-centred group rewards, quadratic log-ratio penalty, token mean.
    "dro": {
        "advantage": {"name": "grpo", "scale_by_std": False},
        "loss": {"name": "dro", "beta": 0.1},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
