"""ProRAG's dual-granularity advantage: the group-normalised outcome advantage plus beta times the group-normalised
process score of the step each token belongs to.

Paper: "ProRAG: Process-Supervised Reinforcement Learning for Retrieval-Augmented Generation", arXiv:2601.21912
(code: lilinwz/ProRAG, ``prorag/rl/trainer.py`` and ``prorag/rl/rollout.py`` at the repository's head).

For a group g of G episodes of one question, episode i with outcome reward R_i and trained-token mask m_{i,t}:
  A^out_i  = (R_i - mean_g R) / (std_g R + 1e-4)                           (std with Bessel's correction, torch's)
  p_{i,t}  = process score of the step (policy turn) holding token t; 0 on untrained tokens (retrieved documents)
  mu_g     = sum_{i,t} m p / sum m,   sigma_g = sqrt(sum_{i,t} m (p - mu_g)^2 / sum m + 1e-8)
             (over every trained token of the group; sigma_g = 1 when the group has at most one trained token)
  A_{i,t}  = A^out_i + beta (p_{i,t} - mu_g) / sigma_g * m_{i,t}
so steps that the process signal rates above the group's average get more credit than the episode's outcome alone
gives them, and worse steps less. The loss is GRPO's clipped surrogate (TRL's GRPOTrainer). beta = 0 is GRPO with
std + 1e-4.

Differs from GRPO: the advantage varies per step inside an episode, by a process score normalised over all the
group's trained tokens (token-weighted: long steps weigh more in mu_g and sigma_g, as in the code).

Gaps filled (fidelity "reconstructed"; the advantage maths is the released code's, the process scores are not):
- the paper's process score of a step is sigmoid(PRM(text up to and including the step)) + a per-step format reward,
  the PRM being trained on MCTS-labelled step values (stages 2-3 of the paper). lmpo ships no such PRM. The step
  scores are read, per policy turn, from ``extras["turn_scores"]`` (B, max_turns), which the ``prorag_prm`` shaper
  writes with any model lmpo can load (:mod:`lmpo.methods.shape.prorag_prm`: ``shapers: [{name: prorag_prm,
  model: ...}]``); without it, from ``extras["turn_rewards"]`` (B, max_turns), the environment's own per-turn rewards (the
  environment acting as the process verifier); without either (single-turn text), from ``batch.token_rewards``
  (B, T) when set. A batch with no process signal gets the outcome advantage alone;
- the outcome reward R is ``batch.rewards`` (the paper's 2 F1 (if F1 >= 0.2) + format in [-1, 1] is a reward
  function of its RAG task, not of the advantage).
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


def step_scores(batch: RolloutBatch) -> Tensor | None:
    """(B, T) float process score of every token's step, or None when the batch carries no process signal."""
    for key in ("turn_scores", "turn_rewards"):
        per_turn = batch.extras.get(key)
        if per_turn is not None and batch.turn_ids is not None:
            per_turn = per_turn.reshape(batch.batch_size, -1).double()
            idx = batch.turn_ids.long().clamp(0, per_turn.shape[1] - 1)
            return torch.gather(per_turn, 1, idx)
    if batch.token_rewards is not None:
        return batch.token_rewards.double()
    return None


def group_token_normalised(p: Tensor, mask: Tensor, group_ids: Tensor) -> Tensor:
    """(p - mu_g) / sigma_g * m with mu_g, sigma_g over every trained token of the row's group (population var)."""
    m = mask.double()
    count = ops.group_sum(m.sum(-1), group_ids)  # (B,): trained tokens of the row's group
    mu = ops.group_sum((p * m).sum(-1), group_ids) / count.clamp_min(1)
    var = ops.group_sum((((p - mu[:, None]) ** 2) * m).sum(-1), group_ids) / count.clamp_min(1)
    sd = torch.where(count <= 1, torch.ones_like(var), (var + 1e-8).sqrt())
    return (p - mu[:, None]) / sd[:, None] * m


@ADVANTAGES.register("prorag", paper="ProRAG: Process-Supervised Reinforcement Learning for Retrieval-Augmented "
                     "Generation", arxiv="2601.21912", fidelity="reconstructed")
@dataclass(frozen=True)
class ProRAGAdvantage:
    """Outcome advantage + beta x group-token-normalised step score (module docstring).

    Args:
        beta: weight of the process term (``--prm_beta``: 0.3 in the released run script, argparse default 0.5).
        eps: added to the outcome std (the code's 1e-4).
    """

    beta: float = hp(0.3, ge=0)
    eps: float = hp(1e-4, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        mask = batch.response_mask
        r = batch.rewards.double()
        sd = ops.group_std(r, batch.group_ids)
        den = sd + self.eps
        a_out = ops.group_centered(r, batch.group_ids) / torch.where(den > 0, den, torch.ones_like(den))
        adv = a_out[:, None].expand(mask.shape)
        p = step_scores(batch)
        if p is not None and self.beta != 0:
            adv = adv + self.beta * group_token_normalised(p, mask, batch.group_ids)
        return ops.zero_outside(adv, mask).to(torch.float32)


# Released run script (scripts/rl.sh): beta 0.3, G = 8, lr 1e-5 (LoRA); TRL GRPOTrainer loss: clip 0.2, no KL (the
# TRL version, so its loss aggregation, is not pinned in the repository: GRPO's per-sequence token mean here).
PRESETS = {
    "prorag": {
        "advantage": {"name": "prorag", "beta": 0.3},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "kl": {"beta": 0.0},
    },
}
