"""G-RA: Gated Reward Accumulation, immediate (per-turn) rewards count only when the outcome passes a gate.

Paper: Sun, Li, Chen, Qin, Hu, "Stabilizing Long-term Multi-turn Reinforcement Learning with Gated Rewards",
arXiv:2508.10548 (no released code found).

A trajectory tau has a high-level (outcome) reward r^high(tau) and immediate rewards r^low_t for its turns t (in the
paper, rule-based step critics of a software-engineering agent: format, tool-call validity, ...). Adding them
directly ("direct reward accumulation", D-RA)

    R_D(tau) = r^high(tau) + sum_t r^low_t

lets the policy farm immediate rewards in failed trajectories (reward hacking; the paper's D-RA runs collapse).
G-RA accumulates them only when the high-level reward reaches the threshold Delta:

    R_G(tau) = r^high(tau) + 1[r^high(tau) >= Delta] * sum_t r^low_t,

equivalently r~_t = r^low_t if r^high >= Delta else 0 per turn. The gated return then feeds an ordinary
on-policy algorithm (the preset: GRPO's advantage and clipped loss).

In lmpo: r^high = ``batch.rewards`` (the configured ``rewards:``, the task's outcome, e.g. ``env_success``) and
r^low_t = ``extras["turn_rewards"]`` (the environment's per-turn rewards of ``rollout.mode: episodes``). The shaper
rewrites ``batch.rewards`` to R_G (R_D with ``gated=False``, the paper's baseline) and ``extras["turn_rewards"]``
to the gated r~_t, so turn-level advantages (GiGPO, ...) downstream see the gated rewards too. Do not use the
reward ``env_return`` as r^high here: it already is the sum of the immediate rewards.

Differs from GRPO: the reward, not the estimator: GRPO on R_G. Without ``turn_rewards`` (single-turn batches) there
are no immediate rewards and R_G = r^high.

Gaps (fidelity "reconstructed": only the abstract and a summary of the method were available): the threshold
Delta (default 1.0: a binary outcome must succeed), the equal weighting of the immediate rewards
(``immediate_weight`` = 1) and the base algorithm are not from the paper; its generalisation to several
priority-ordered reward channels (a channel counts only if every higher-priority one passes its gate) is not
implemented (one high-level channel, one immediate channel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmpo.batch import RolloutBatch
from lmpo.methods.params import hp
from lmpo.methods.turns import played
from lmpo.registry import SHAPERS


@SHAPERS.register("gated_reward_accumulation", paper="Stabilizing Long-term Multi-turn Reinforcement Learning with "
                  "Gated Rewards (G-RA)", arxiv="2508.10548", fidelity="reconstructed")
@dataclass(frozen=True)
class GatedRewardAccumulation:
    """R = r^high + 1[r^high >= threshold] * immediate_weight * sum_t r^low_t (arXiv:2508.10548).

    Args:
        threshold: Delta, the high-level reward an episode needs before its immediate rewards count.
        gated: False gives direct accumulation (D-RA, the paper's baseline): every immediate reward counts.
        immediate_weight: scale of the immediate rewards in the return.
    """

    threshold: float = 1.0
    gated: bool = True
    immediate_weight: float = hp(1.0, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> RolloutBatch:
        low = batch.extras.get("turn_rewards")
        if low is None:  # no immediate rewards: the outcome alone
            return batch
        high = batch.rewards
        n = batch.extras.get("num_turns")
        live = played(n.long(), low.shape[1]) if n is not None else torch.ones_like(low, dtype=torch.bool)
        low = torch.where(live.to(low.device), low, torch.zeros_like(low)).to(high.dtype)
        gate = (high >= self.threshold) if self.gated else torch.ones_like(high, dtype=torch.bool)
        kept = torch.where(gate[:, None], low, torch.zeros_like(low)) * self.immediate_weight
        extras = {**batch.extras, "turn_rewards": kept.to(batch.extras["turn_rewards"].dtype)}
        return batch.replace(rewards=high + kept.sum(-1), extras=extras)


# The paper's base algorithm and Delta were not retrieved: GRPO's estimator and loss (the grpo preset's values) on the
# gated return, Delta = 1 (a binary outcome must succeed). Configure the outcome reward separately from the
# environment's per-turn rewards (e.g. rewards: [{name: env_success}] with rollout.mode: episodes).
PRESETS = {
    "g_ra": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "shapers": [{"name": "gated_reward_accumulation", "threshold": 1.0}],
        "kl": {"beta": 0.04, "estimator": "k3", "mode": "loss"},
    },
}
