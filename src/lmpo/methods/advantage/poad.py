"""POAD: PPO with a token-level critic and BAD, the Bellman backup with Action Decomposition.

Paper: Wen et al. 2024, "Reinforcing Language Agents via Policy Optimization with Action Decomposition",
arXiv:2405.15821 (NeurIPS 2024), Sec. 4 (Eqs. 7-8, BAD) and the released code (morning9393/ADRL). An environment
action is a multi-token string a_t = (w_1 .. w_|a|). The critic is token-level, V(o_t, w_{1:j-1}); BAD backs values up
inside an action with no discount and no reward, and applies the reward and gamma only across action boundaries:

    j < |a_t|:  delta_j = V(o_t, w_{1:j}) - V(o_t, w_{1:j-1})                 gae_j = delta_j + lambda gae_{j+1}
    j = |a_t|:  delta   = r_t + gamma V(o_{t+1}, {}) - V(o_t, w_{1:|a|-1})     gae   = delta + gamma lambda gae_next

returns = gae + V (the critic's targets); the policy takes token-level PPO with these advantages. What differs from
token-level GAE (``advantage: gae``, "NTPO" in the paper): gamma is not applied at every token, so a long action is
not discounted against a short one.

In lmpo an action is a run of tokens with the same ``batch.turn_ids`` (``rollout.mode: episodes`` gives a policy turn
and the observation that answers it one id; observation tokens are masked and skipped). Without ``turn_ids`` the
whole reply is one action, so on single-turn tasks POAD equals ``gae`` with gamma = 1. Rewards: the outcome on the
last trained token and any ``token_rewards`` where they fall (``kl.mode: reward`` puts a KL term on every token; the
paper's intra-action reward is 0, which lmpo keeps when the KL is in the loss or off). Gaps filled: whitening of the
advantages (``whiten``, as lmpo's ``gae``; the paper's code normalises advantages per batch too) and the critic (a
value head on the policy trunk by default; the paper trains LoRA critics beside LoRA actors: ``critic.model:
separate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.advantage.gae import dense_rewards, gae
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES


@ADVANTAGES.register("poad", paper="Reinforcing Language Agents via Policy Optimization with Action Decomposition",
                     arxiv="2405.15821", fidelity="reconstructed")
@dataclass(frozen=True)
class POADAdvantage:
    """BAD-GAE: gamma only across actions (``turn_ids``), none inside; arXiv:2405.15821 Eqs. 7-8. Provides
    ``value_targets`` (returns = gae + V).

    Args:
        gamma: discount per action (the released config's 0.95).
        lam: GAE lambda (0.95 in the released code), applied at every token.
        whiten: whiten the advantages over the batch's trained tokens.
    """

    gamma: float = hp(0.95, ge=0, le=1)
    lam: float = hp(0.95, ge=0, le=1)
    whiten: bool = True
    needs: ClassVar[frozenset[str]] = frozenset({"values"})

    def advantages_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        # no turns: the whole reply is one action
        actions = batch.turn_ids if batch.turn_ids is not None else torch.zeros_like(batch.response_ids)
        return gae(dense_rewards(batch), batch.extras["values"], batch.response_mask, self.gamma, self.lam, actions)

    def __call__(self, batch: RolloutBatch) -> Tensor:
        adv = self.advantages_returns(batch)[0]
        return ops.masked_whiten(adv, batch.response_mask) if self.whiten else adv

    def value_targets(self, batch: RolloutBatch) -> Tensor:  # ValueTargets
        return self.advantages_returns(batch)[1]


PRESETS = {
    # POAD (arXiv:2405.15821, released code): BAD-GAE with gamma 0.95 across actions, lambda 0.95, token-level PPO
    # clip 0.2, a token-level critic (value head on the policy trunk, clipped value loss as lmpo's ppo preset).
    "poad": {
        "advantage": {"name": "poad", "gamma": 0.95, "lam": 0.95},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
        "critic": {"model": "shared", "vf_coef": 0.1, "cliprange_value": 0.2},
    },
}
