"""TP-GRPO: thought-level process rewards from a generative PRM's step verdicts, with ability-adaptive weights.

Paper: "Good Learners Think Their Thinking: Generative PRM Makes Large Reasoning Model More Efficient Math Learner"
(ICLR 2026 version: "Smarter Not Harder: Generative Process Evaluation with Intrinsic-Signal Driving and
Ability-Adaptive Reward Shaping"), 2025, arXiv:2507.23317 (code cs-holder/tp_grpo, not retrievable here).

A generative PRM gives every step of reply i a verdict v_{i,k} in {+1 (correct), -1 (wrong)} (0: no verdict);
adjacent steps with the same verdict form one *thought* (:func:`merge_thoughts`), the unit of process reward. With
the outcome R_i in {0, 1} and the group's accuracy p = mean_g R (the model's current ability on the prompt):
  r_{i,t} = R_i - lambda_c(p) 1[R_i = 1, v_{k(t)} = -1] + lambda_w(p) 1[R_i = 0, v_{k(t)} = +1]
  lambda_c(p) = lam * p          (wrong thoughts in right answers: penalised more as the prompt gets easier)
  lambda_w(p) = lam * (1 - p)    (right thoughts in wrong answers: credited more on hard prompts)
  A_{i,t} = (r_{i,t} - mean_g R) / s_g,   s_g = std_g R + eps (Bessel), or 1 when that std is 0
so verdicts that agree with the outcome leave GRPO's advantage unchanged (the card's property), and merging steps
into thoughts never changes a token's reward (a thought's tokens share its verdict). Loss: GRPO's clipped surrogate.

Verdicts come from the ``process_credit`` planner (``needs: step_rewards``): v = sign of each step's score, so any
step scorer serves as the GenPRM (a generative judge returning +1 / -1 per step, or the exact rule scorers here).

Gaps filled (fidelity "reconstructed"): the paper's exact shaping formulas were not retrievable; the reward above
follows the card's reading of the abstract (process bonus/penalty only where a thought disagrees with the outcome,
its size adapted to the group accuracy), with linear lambda(p) and lam = 0.5 (our choice); the normaliser uses the
outcome's group statistics so that agreement is exactly GRPO; the asynchronous judging pipeline is not reproduced
(judging runs inside collection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES


def merge_thoughts(verdicts: list[int]) -> list[tuple[int, int, int]]:
    """Runs of adjacent steps with the same verdict: (first step, last step, verdict)."""
    out: list[tuple[int, int, int]] = []
    for k, v in enumerate(verdicts):
        if out and out[-1][2] == v:
            out[-1] = (out[-1][0], k, v)
        else:
            out.append((k, k, v))
    return out


def token_verdicts(batch: RolloutBatch) -> Tensor:
    """(B, T) verdict of each token's step: sign of ``extras['step_rewards']`` at ``turn_ids`` (0 past the steps)."""
    sr = batch.extras["step_rewards"].double()
    n = batch.extras["num_steps"].long()
    S = sr.shape[1]
    live = torch.arange(S)[None, :] < n[:, None]
    v = torch.where(live, torch.sign(sr), torch.zeros_like(sr))
    k = batch.turn_ids.long().clamp(0, S - 1)
    return torch.gather(v, 1, k) * (n[:, None] > 0)


@ADVANTAGES.register("tp_grpo", paper="Good Learners Think Their Thinking: Generative PRM Makes Large Reasoning Model "
                     "More Efficient Math Learner", arxiv="2507.23317", fidelity="reconstructed")
@dataclass(frozen=True)
class TPGRPOAdvantage:
    """Outcome + ability-adaptive thought-level process shaping, GRPO-normalised (module docstring).

    Args:
        lam: size of the process bonus / penalty (lambda(p) = lam p or lam (1 - p)).
        threshold: R >= threshold counts as a correct answer. eps: added to the group std.
    """

    lam: float = hp(0.5, ge=0, le=1)
    threshold: float = 0.5
    eps: float = hp(1e-6, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"step_rewards"})

    def token_rewards(self, batch: RolloutBatch) -> Tensor:
        """r_{i,t} (B, T) float64 (module docstring), 0 off the mask."""
        R = batch.rewards.double()
        ok = (R >= self.threshold).double()
        p = ops.group_mean(ok, batch.group_ids)
        v = token_verdicts(batch)
        pen = (self.lam * p * ok)[:, None] * (v < 0)
        bonus = (self.lam * (1 - p) * (1 - ok))[:, None] * (v > 0)
        return ops.zero_outside(R[:, None] - pen + bonus, batch.response_mask)

    def __call__(self, batch: RolloutBatch) -> Tensor:
        R = batch.rewards.double()
        mean = ops.group_mean(R, batch.group_ids)
        sd = ops.group_std(R, batch.group_ids)
        s = torch.where(sd > 0, sd + self.eps, torch.ones_like(sd))
        adv = (self.token_rewards(batch) - mean[:, None]) / s[:, None]
        return ops.zero_outside(adv, batch.response_mask).to(torch.float32)


PRESETS = {
    "tp_grpo": {
        "advantage": {"name": "tp_grpo", "lam": 0.5},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "planners": [{"name": "process_credit", "separator": "\n\n"}],
        "kl": {"beta": 0.0},
    },
}
