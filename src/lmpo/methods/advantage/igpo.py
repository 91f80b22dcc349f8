"""IGPO: Information Gain-based Policy Optimization, turn rewards = gain in the policy's belief in the gold answer.

Paper: Wang et al., "Information Gain-based Policy Optimization: A Simple and Effective Approach for Multi-Turn LLM
Agents", ICLR 2026, arXiv:2510.14967 (official code: GuoqingWang1/IGPO, ``core_algos.py`` / ``info_gain.py``).

With a the ground-truth answer (tokens a_1..a_L) and o_{i,<t} everything episode i saw and said before its turn t,
the policy's confidence is the geometric-mean probability of a, teacher-forced:

  C_{i,t} = exp( (1/L) sum_j log pi_theta(a_j | q, o_{i,<t}, a_<j) )

(``extras["turn_answer_confidence"]``, recorded by ``rollout.mode: episodes`` with ``mode_params.answer_confidence:
true``: C at the start of each turn, so C_{i,0} conditions on the question alone). Turn rewards of an episode with
T turns (0-based here):

  r_{i,t} = C_{i,t+1} - C_{i,t}   for t < T - 1   (the information gain of turn t and its observation)
  r_{i,T-1} = the outcome reward  (the paper: F1 of the final answer; here ``batch.rewards`` + summed token rewards)

Joint normalisation over all turn rewards of a group's episodes, r~ = (r - mean) / (std + eps) (population std; a
pool of one reward has std 1), then the discounted accumulation A_{i,T-1} = r~_{i,T-1},
A_{i,t} = r~_{i,t} + gamma A_{i,t+1}, broadcast to the tokens of turn t; the loss is the clipped surrogate.

Differs from GRPO: dense, intrinsic turn rewards, so a group whose outcomes all tie still gets a signal, and turns
that made the answer more likely are credited. With one turn per episode it is GRPO with the population std.

Choices (fidelity "reconstructed": equations from the card, which read the paper and the released code; not
re-checked against the code here): the IG of turn t is measured at the start of turn t + 1, i.e. after the turn's
reply and the observation answering it; the gold answer is the environment's ``answer`` attribute (or the row's
``answer``); the paper's -2 format penalty and its "separate" normalisation and curriculum weights are not
implemented; gamma = 1 (code default). Without confidences (single-turn batches) every row is one turn whose reward
is the outcome; a multi-turn batch without them is an error naming the missing setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import DataError
from lmpo.methods.advantage.grpo import outcome_returns
from lmpo.methods.params import hp
from lmpo.methods.turns import played, turn_layout, turns_to_tokens
from lmpo.registry import ADVANTAGES

CONFIDENCE = "turn_answer_confidence"


def igpo_turn_rewards(confidence: Tensor, num_turns: Tensor, outcome: Tensor) -> Tensor:
    """(B, M) float64: C_{t+1} - C_t on turns before the last, the outcome on the last, 0 after it."""
    C = confidence.double()
    B, M = C.shape
    r = torch.zeros(B, M, dtype=torch.float64, device=C.device)
    if M > 1:
        r[:, :-1] = C[:, 1:] - C[:, :-1]
    last = (num_turns - 1).clamp_min(0)
    live = played(num_turns, M)
    r = torch.where(live, r, torch.zeros_like(r))
    return r.scatter(1, last[:, None], outcome.double()[:, None])


@ADVANTAGES.register("igpo", paper="Information Gain-based Policy Optimization: A Simple and Effective Approach for "
                     "Multi-Turn LLM Agents", arxiv="2510.14967", fidelity="reconstructed")
@dataclass(frozen=True)
class IGPOAdvantage:
    """Information-gain turn rewards + outcome, jointly z-scored per group, accumulated backwards (arXiv:2510.14967).

    Args:
        gamma: discount of the turn-level accumulation (code default 1.0). eps: added to the std.
    """

    gamma: float = hp(1.0, ge=0, le=1)
    eps: float = hp(1e-6, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset()

    def turn_rewards(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """(raw turn rewards (B, M) float64, num_turns (B,))."""
        R = outcome_returns(batch)
        n, layout = turn_layout(batch, R)
        conf = batch.extras.get(CONFIDENCE)
        if conf is None:
            if bool((n > 1).any()):
                raise DataError("advantage igpo: a multi-turn batch needs extras['turn_answer_confidence']; set "
                                "rollout.mode_params.answer_confidence: true (and give the environment an `answer`).")
            conf = torch.zeros_like(layout)
        conf = conf.to(layout.device)[:, : layout.shape[1]]
        return igpo_turn_rewards(conf, n, R), n

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r, n = self.turn_rewards(batch)
        B, M = r.shape
        live = played(n, M)
        pool = batch.group_ids[:, None].expand(B, M)[live]
        vals = r[live]
        dev = ops.group_centered(vals, pool)
        cnt = ops.group_count(pool, torch.float64)
        std = torch.where(cnt > 1, ops.group_std(vals, pool, unbiased=False), torch.ones_like(vals))
        den = std + self.eps
        z = torch.zeros_like(r)
        z[live] = dev / torch.where(den > 0, den, torch.ones_like(den))
        adv = torch.zeros_like(z)
        running = torch.zeros(B, dtype=torch.float64, device=z.device)
        for t in range(M - 1, -1, -1):
            running = torch.where(live[:, t], z[:, t] + self.gamma * running, torch.zeros_like(running))
            adv[:, t] = running
        return turns_to_tokens(adv, batch)


# Code defaults: gamma = 1, joint normalisation; GRPO clipped loss 0.2 with token-mean aggregation. The KL setting of
# the released recipe was not recovered: none here. Set rollout.mode_params.answer_confidence: true for episodes.
PRESETS = {
    "igpo": {
        "advantage": {"name": "igpo", "gamma": 1.0},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
