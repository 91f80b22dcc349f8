"""R3L: positive amplification of a mean-baseline advantage, and the pivotal credit mask of reflect-then-retry.

Paper: "R^3L: Reflect-then-Retry Reinforcement Learning with Language-Guided Exploration, Pivotal Credit, and
Positive Amplification", arXiv:2601.03715 (code: shiweijiezero/R3L, a Trinity-RFT fork; advantage
``opmd_reweight_adv`` / ``step_wise_opmd_reweight_adv``, loss ``opmd``).

Per group of episodes of one task, with scalar episode rewards R_i:
  b    = mean_i R_i                       (baseline "mean"; "logavgexp": b = tau (logsumexp(R / tau) - log G))
  A_i  = 1                                if R_i >= 1          (the task is solved: a fixed credit)
       = alpha (R_i - b)                  if R_i - b >= 0      (positive amplification of above-baseline partials)
       = R_i - b                          otherwise            (failures keep their plain credit)
broadcast to every trained token of the episode (a group of one has b = 0, as in the released code). No std
division: scarce successes are not shrunk by a failure-heavy group's spread, they are amplified.

Pivotal credit: a retry replays the environment to the pivot turn k named by the reflection and continues from
there; its shared prefix (the first k policy turns) carries no contrastive signal, so for both the retry and the
attempt it was derived from only the turns from k on are trained. This component reads the pivot per row from
``extras["pivot_turn"]`` (B,) (-1 or absent: no pivot) and removes the tokens of turns < k from training through the
``token_mask`` extension point (a mask, not a zero advantage: the masked tokens leave the token-mean too).

The loss of the method is OPMD's (:class:`lmpo.methods.loss.opmd.OPMDLoss`): token mean of -A log pi / (1 + tau).

Differs from GRPO: no std normalisation, solved episodes get a fixed credit 1, above-baseline partial successes are
multiplied by alpha, and retried prefixes are not trained.

Gaps filled (fidelity "reconstructed"): the advantage and the loss follow the released code exactly (checked in the
code index: baseline, the >= 1 and >= 0 rules, alpha 3, tau 1, singleton baseline 0); the *reflect-then-retry
rollout* itself (the policy writing a JSON reflection that names a pivot step, the environment replayed to it and a
guided retry stored without its guidance) is not implemented in lmpo's episodes rollout yet: without it no row has a
pivot and the method is R3L "w/o Reflect-Retry" (the paper's ablation ``opmd_reweight_adv``: positive amplification
only). A rollout that writes ``extras["pivot_turn"]`` gets the pivotal mask. R_i is ``batch.rewards`` (the episode's
return with ``rollout.mode: episodes``; the code's step-wise variant uses the last step's reward, equal to it when
the environment rewards only the final turn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.advantage.grpo import broadcast, outcome_returns
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES


def amplified(r: Tensor, group_ids: Tensor, alpha: float, solved: float, baseline: str, tau: float) -> Tensor:
    """(B,) R3L scores: 1 for solved rows, alpha (R - b) above the baseline, R - b below it."""
    r = r.double()
    n = ops.group_count(group_ids, torch.float64)
    if baseline == "mean":
        b = ops.group_sum(r, group_ids) / n
    else:  # logavgexp, stabilised by the group max
        inv, G = ops.group_index(group_ids)
        mx = torch.full((G,), -math.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r / tau, "amax")
        s = ops.group_sum(torch.exp(r / tau - mx[inv]), group_ids)
        b = tau * (mx[inv] + torch.log(s) - torch.log(n))
    b = torch.where(n > 1, b, torch.zeros_like(b))
    score = r - b
    score = torch.where(score >= 0, alpha * score, score)
    return torch.where(r >= solved, torch.ones_like(score), score)


def pivot_mask(batch: RolloutBatch) -> Tensor:
    """(B, T) bool: False on the tokens of turns before the row's pivot (``extras["pivot_turn"]``), else True."""
    pivot = batch.extras.get("pivot_turn")
    keep = torch.ones_like(batch.response_mask)
    if pivot is None or batch.turn_ids is None:
        return keep
    k = pivot.reshape(-1).to(batch.turn_ids.device).long()
    return keep & ((k[:, None] < 0) | (batch.turn_ids >= k[:, None]))


@ADVANTAGES.register("r3l", paper="R^3L: Reflect-then-Retry Reinforcement Learning with Language-Guided "
                     "Exploration, Pivotal Credit, and Positive Amplification", arxiv="2601.03715",
                     fidelity="reconstructed")
@dataclass(frozen=True)
class R3LAdvantage:
    """Mean-baseline advantage with positive amplification, plus the pivotal credit mask (module docstring).

    Args:
        alpha: amplification of above-baseline scores of unsolved episodes (code: 3).
        solved_reward: an episode whose reward reaches this is solved and gets credit 1.
        baseline: "mean" or "logavgexp" (the code's ``opmd_baseline``).
        tau: temperature of the logavgexp baseline.
    """

    alpha: float = hp(3.0, ge=0)
    solved_reward: float = 1.0
    baseline: str = hp("mean", choices=("mean", "logavgexp"))
    tau: float = hp(1.0, gt=0)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        a = amplified(outcome_returns(batch), batch.group_ids, self.alpha, self.solved_reward, self.baseline, self.tau)
        return broadcast(a, batch.response_mask & pivot_mask(batch))

    def token_mask(self, batch: RolloutBatch) -> Tensor:  # TokenMask: the retried prefix is not trained
        return pivot_mask(batch)


# The released ALFWorld config: alpha 3, OPMD loss with tau 1 (token mean), no KL, temperature 1, G = 8.
PRESETS = {
    "r3l": {
        "advantage": {"name": "r3l", "alpha": 3.0, "baseline": "mean"},
        "loss": {"name": "opmd", "tau": 1.0},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
