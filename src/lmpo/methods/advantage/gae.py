"""Generalized Advantage Estimation over a learned value function (PPO with a critic).

Papers:
- Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
  arXiv:1506.02438, Eq. 16 (and Eq. 11's TD residual): delta_t = r_t + gamma V(s_{t+1}) - V(s_t),
  A_t = sum_l (gamma lambda)^l delta_{t+l}, computed backwards as A_t = delta_t + gamma lambda A_{t+1}.
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347, Eqs. 9 and 11 (the
  truncated GAE and the value-function target V_targ = A_t + V(s_t) that the critic regresses on).
- Ouyang et al. 2022, "Training language models to follow instructions with human feedback" (InstructGPT),
  arXiv:2203.02155, Eq. 2: the token reward is -beta KL per token, with the outcome score added at the last token.

What differs from GRPO: no group baseline; the baseline is a critic V(s_t) per token (``needs = {"values"}``: the
trainer builds a :class:`lmpo.train.critic.Critic` and puts its pre-update estimates in ``extras["values"]``), and
credit is assigned per token through the TD residuals.

Token rewards (dense): ``batch.token_rewards`` (the KL penalty when ``kl.mode: reward``, or a rollout mode's
per-token rewards; 0 off the mask) plus the outcome reward ``batch.rewards`` on the last trained token of each row,
as TRL's PPOTrainer and verl do. Masked tokens inside a response (tool or environment output in multi-turn episodes)
are skipped as verl's ``compute_gae_advantage_return`` skips them: they neither break the recursion nor contribute a
TD residual, so V and A pass through them to the previous trained token. After the last trained token V = 0 (the
episode ends; a truncated reply is not bootstrapped, as in TRL and verl).

The critic's regression target (``value_targets``, an extension point read by the trainer) is the return
``A_t + V(s_t)`` before whitening (arXiv:1707.06347; verl and TRL alike). The advantages given to the policy loss
are whitened over the batch's trained tokens when ``whiten`` is set (TRL and verl both whiten; verl's
``masked_whiten``; the paper leaves normalisation to the implementation).
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


def dense_rewards(batch: RolloutBatch) -> Tensor:
    """Per-token rewards (B, T): ``token_rewards`` (0 off the mask) plus the outcome on each row's last trained token."""
    mask = batch.response_mask
    r = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if batch.token_rewards is not None:
        r = ops.zero_outside(batch.token_rewards.float(), mask)
    pos = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    last = torch.where(mask, pos, -1).amax(-1)  # -1 for a row with no trained token
    rows = torch.nonzero(last >= 0).flatten()
    return r.index_put((rows, last[rows]), batch.rewards.float()[rows].to(r.dtype), accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, actions: Tensor | None = None,
        ) -> tuple[Tensor, Tensor]:
    """``(advantages, returns)`` (B, T) by the backward recursion of arXiv:1506.02438 Eq. 16, 0 off the mask.

    Masked tokens are skipped (V and A carried through them); V = 0 after the last trained token. ``actions`` (B, T)
    ids (POAD's action decomposition, :mod:`lmpo.methods.advantage.poad`): gamma applies only where the next trained
    token belongs to another action (or none follows); inside an action the discount is 1 and the trace decays by
    lambda alone. ``None``: every token is its own action (token-level GAE)."""
    rewards, values = ops.zero_outside(rewards.float(), mask), ops.zero_outside(values.float(), mask)
    B, T = mask.shape
    next_v = torch.zeros(B, dtype=torch.float32, device=mask.device)
    last = torch.zeros_like(next_v)
    next_action = torch.full((B,), -1, dtype=torch.long, device=mask.device)  # -1: no trained token follows
    adv = torch.zeros(B, T, dtype=torch.float32, device=mask.device)
    for t in reversed(range(T)):
        here = mask[:, t]
        if actions is None:
            disc = torch.full_like(next_v, gamma)
        else:  # across an action boundary (or at the end): gamma; inside an action: 1
            disc = torch.where((next_action < 0) | (actions[:, t] != next_action), gamma, 1.0)
            next_action = torch.where(here, actions[:, t].long(), next_action)
        delta = rewards[:, t] + disc * next_v - values[:, t]
        last = torch.where(here, delta + disc * lam * last, last)
        next_v = torch.where(here, values[:, t], next_v)
        adv[:, t] = last
    adv = ops.zero_outside(adv, mask)
    return adv, ops.zero_outside(adv + values, mask)


@ADVANTAGES.register("gae", paper="High-Dimensional Continuous Control Using Generalized Advantage Estimation; "
                     "Proximal Policy Optimization", arxiv="1506.02438")
@dataclass(frozen=True)
class GAEAdvantage:
    """GAE(gamma, lambda) on the critic's values; arXiv:1506.02438 Eq. 16. Provides ``value_targets`` (returns).

    Args:
        gamma: discount per token (1.0 in TRL and verl for language).
        lam: the GAE lambda (TRL 0.95; verl 1.0).
        whiten: whiten the advantages over the batch's trained tokens (TRL and verl: yes).
    """

    gamma: float = hp(1.0, ge=0, le=1)
    lam: float = hp(0.95, ge=0, le=1)
    whiten: bool = True
    needs: ClassVar[frozenset[str]] = frozenset({"values"})

    def advantages_returns(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        return gae(dense_rewards(batch), batch.extras["values"], batch.response_mask, self.gamma, self.lam)

    def __call__(self, batch: RolloutBatch) -> Tensor:
        adv = self.advantages_returns(batch)[0]
        return ops.masked_whiten(adv, batch.response_mask) if self.whiten else adv

    def value_targets(self, batch: RolloutBatch) -> Tensor:  # ValueTargets: what the critic regresses on
        return self.advantages_returns(batch)[1]


PRESETS = {
    # PPO with a critic, TRL's PPOTrainer defaults (gamma 1, lambda 0.95, clip 0.2, value clip 0.2, vf_coef 0.1, k1
    # KL per token in the reward with beta 0.05, whitened advantages); the critic is a value head on the policy's
    # trunk (critic.model: shared), its own AdamW.
    "ppo": {
        "advantage": {"name": "gae", "gamma": 1.0, "lam": 0.95, "whiten": True},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.05, "estimator": "k1", "mode": "reward"},
        "critic": {"model": "shared", "vf_coef": 0.1, "cliprange_value": 0.2},
    },
}
