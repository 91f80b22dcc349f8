"""Flow-GRPO of AgentFlow: the trajectory's outcome advantage on every turn, each turn one single-turn update.

Paper: Li, Zhang, Han, Liu, Xie, Zhang, Choi, Zou, Lu, "In-the-Flow Agentic System Optimization for Effective
Planning and Tool Use", ICLR 2026, arXiv:2510.05592 (official code: lupantech/AgentFlow). Not the flow-matching
"Flow-GRPO" of image models (arXiv:2505.05470), hence the registered name ``agentflow_flow_grpo``.

For a query, G trajectories tau_i = {(s_t^i, a_t^i)}_{t=1..T_i} are sampled; the final outcome R(tau_i) is broadcast
to every turn (r_t^i = R(tau_i)) and normalised over the group,

  A_t^i = (R(tau_i) - mean_j R(tau_j)) / (std_j R(tau_j) + eps)            (the same for every turn and token),

and the planner's objective (the paper's Flow-GRPO objective) treats each turn as one single-turn GRPO update:

  J(theta) = E[ (1/G) sum_i (1/T_i) sum_t (1/|a_t^i|) sum_k min(rho_{i,t,k} A_t^i, clip(rho_{i,t,k}, 1 - eps_low,
               1 + eps_high) A_t^i) ] - beta KL(pi_theta || pi_ref),

with rho_{i,t,k} the ratio of token k of turn t. The advantage is GRPO's on the episode return (``advantage: grpo``
on a ``rollout.mode: episodes`` batch, whose reward ``env_return`` is the outcome); this file is the turn-level
normalisation: every turn of a trajectory weighs the same whatever its length, and every trajectory weighs the same
whatever its number of turns. The loss returns the clipped surrogate with per-token weights
``n_i / (T_i |a_t^i|)`` (n_i the row's trained tokens), so that the per-sequence token mean of the aggregator
``seq_mean_token_mean`` (the preset's) is exactly the objective above; the KL term is added by the trainer with
the same aggregator (GRPO's per-sequence mean).

Differs from GRPO (arXiv:2402.03300): GRPO's per-sequence token mean weights a trajectory's turns by their token
counts (a long turn dominates); here each turn is its own unit. With one turn per trajectory it is GRPO exactly.

T_i counts the turns with at least one trained token (``turn_ids``; a batch without them is one turn per row).
The released verl code instead flattens every turn into its own sample and takes the token mean over the batch
(the aggregator ``token_mean`` with ``ppo_clip``); the paper's per-trajectory form is the one implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import LossOut
from lmpo.methods.loss.ppo_clip import clipped_surrogate
from lmpo.methods.params import hp
from lmpo.methods.turns import token_turns
from lmpo.registry import LOSSES


def turn_weights(batch: RolloutBatch) -> Tensor:
    """(B, T) weight n_i / (T_i |a_t^i|) of every trained token (0 elsewhere): a row's token mean of weighted values
    is its mean over turns of each turn's token mean."""
    mask = batch.response_mask
    turns = token_turns(batch)
    if turns.numel() == 0:
        return mask.to(torch.float32)
    M = int(turns.max()) + 1
    idx = turns.clamp_min(0)
    per_turn = torch.zeros(mask.shape[0], M, dtype=torch.float64, device=mask.device)
    per_turn.scatter_add_(1, idx, mask.double())  # |a_t^i|
    n_turns = (per_turn > 0).sum(-1).clamp_min(1)  # T_i
    n_tokens = per_turn.sum(-1)  # n_i
    w = n_tokens[:, None] / (n_turns[:, None] * per_turn.gather(1, idx).clamp_min(1.0))
    return ops.zero_outside(w.to(torch.float32), mask)


@LOSSES.register("agentflow_flow_grpo", paper="In-the-Flow Agentic System Optimization for Effective Planning and "
                 "Tool Use (AgentFlow, Flow-GRPO)", arxiv="2510.05592")
@dataclass(frozen=True)
class AgentFlowFlowGRPOLoss:
    """Clipped surrogate with every turn one unit: (1/T_i) sum_t (1/|a_t|) sum_k per trajectory (arXiv:2510.05592).

    Args:
        epsilon: eps_low (released config 0.2). epsilon_high: eps_high (released config 0.3; None = symmetric).
    """

    epsilon: float = hp(0.2, ge=0)
    epsilon_high: float | None = hp(0.3, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def __call__(self, logprobs: Tensor, batch: RolloutBatch) -> LossOut:
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        mask = batch.response_mask
        ratio = ops.token_ratio(logprobs, batch.old_logprobs)
        loss, clipped = clipped_surrogate(ratio, batch.advantages, self.epsilon, eps_high, None)
        w = turn_weights(batch).to(loss.dtype)
        metrics = {
            "loss/clip_frac": ops.masked_mean(clipped.float(), mask).detach(),
            "loss/ratio_mean": ops.masked_mean(ratio, mask).detach(),
        }
        return LossOut(ops.zero_outside(loss * w, mask), metrics)


# Released train/config.yaml: G = 8, clip 0.2 / 0.3, KL loss coefficient 0.001 (as a loss), no entropy bonus,
# temperature 0.7; the advantage is GRPO's on the trajectory outcome.
PRESETS = {
    "agentflow_flow_grpo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "agentflow_flow_grpo", "epsilon": 0.2, "epsilon_high": 0.3},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.001, "estimator": "k3", "mode": "loss"},
    },
}
