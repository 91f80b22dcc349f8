"""GiGPO: Group-in-Group Policy Optimization, episode-level plus anchor-state step-level group advantages.

Paper: Feng, Xue, Liu, An, "Group-in-Group Policy Optimization for LLM Agent Training", NeurIPS 2025,
arXiv:2505.10978 (official code: langfengQ/verl-agent, ``gigpo/core_gigpo.py``).

N episodes are played from the same start (one group: the same task and environment seed). With R(tau_i) the
episode return and r_t^(i) the reward of step (policy turn) t:

  Eq. 3  episode advantage  A^E(tau_i) = (R(tau_i) - mean_j R(tau_j)) / F_norm,  F_norm = std_j R(tau_j) or 1
  Eq. 5  step return        R_t^(i) = sum_{k >= t} gamma^{k - t} r_k^(i)
  Eq. 6  anchor groups      G^S(s) = {(a_t^(i), R_t^(i)) : s_t^(i) = s}, over all episodes i of the group and
                            all their steps t (a state revisited within one episode joins the same group)
  Eq. 7  step advantage     A^S(a_t^(i)) = (R_t^(i) - mean_{G^S(s_t^(i))} R) / F_norm   (0 in a group of one)
  Eq. 8  A(a_t^(i)) = A^E(tau_i) + omega * A^S(a_t^(i)), on every token of step t's action.

The state s_t^(i) is the observation the policy answered at turn t: ``extras["turn_observation_keys"]`` of the
episodes rollout (a hash of the observation's messages; :func:`lmpo.rollout.episodes.observation_key`), grouped
only within one episode group (``group_ids``). Rewards: R = ``batch.rewards`` (plus summed ``token_rewards``, as
GRPO), r_t = ``extras["turn_rewards"]`` (the environment's per-turn rewards).

Differs from GRPO: a second, step-level baseline over identical states, so two actions taken in the same state are
compared by what followed them; and by default F_norm = 1 (the released scripts' ``mode=mean_norm``). Without
observation keys (single-turn batches) or when no state repeats, A^S = 0 and GiGPO is episode-level GRPO (with
F_norm = 1: Dr. GRPO's centring).

Choices, all from the released code: F_norm = std uses Bessel's correction (``torch.std``), epsilon 1e-6; the paper's
episode statistics are over trajectories, while ``episode_norm_reward``'s default (``compute_mean_std_cross_steps``)
takes them over step rows, each trajectory weighted by its number of steps: ``episode_stats="steps"``. An episode
group of one gets A^E = 0 here (lmpo's GRPO convention); verl-agent passes its raw return (mean 0, std 1):
``singleton="raw"``. Not implemented: the optional similarity-based grouping (``enable_similarity``; exact matches
only) and the invalid-action penalty of the scripts (an environment reward in verl-agent; an environment can return
it as a negative turn reward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.advantage.grpo import outcome_returns
from lmpo.methods.params import hp
from lmpo.methods.turns import discounted_turn_returns, played, turn_layout, turns_to_tokens
from lmpo.registry import ADVANTAGES

OBSERVATION_KEYS = "turn_observation_keys"


def _normalise(dev: Tensor, std: Tensor, scale: bool, eps: float) -> Tensor:
    return dev / (std + eps) if scale else dev


def episode_advantage(returns: Tensor, group_ids: Tensor, weights: Tensor, *, scale: bool, eps: float,
                      singleton: str) -> Tensor:
    """Eq. 3 per row (B,): (R - mean) / F_norm within each group, mean and std over the group's rows each counted
    ``weights`` times (1: over trajectories; the number of steps: over step rows)."""
    w = weights.double()
    r = returns.double()
    count = ops.group_sum(w, group_ids)
    mean = ops.group_sum(w * r, group_ids) / count
    dev = r - mean
    std = (ops.group_sum(w * dev * dev, group_ids) / (count - 1).clamp_min(1.0)).sqrt()
    adv = _normalise(dev, std, scale, eps)
    alone = ops.group_count(group_ids, torch.float64) == 1
    return torch.where(alone, r if singleton == "raw" else torch.zeros_like(r), adv)


def step_advantage(step_returns: Tensor, keys: Tensor, group_ids: Tensor, valid: Tensor, *, scale: bool,
                   eps: float) -> Tensor:
    """Eqs. 6-7 (B, M): each valid step's return minus the mean over its anchor group (same episode group, same
    observation key), / F_norm; 0 for a step alone in its anchor group and on invalid entries."""
    B, M = step_returns.shape
    rows = group_ids[:, None].expand(B, M)[valid]
    pair = torch.stack([rows.long(), keys[valid].long()])
    if pair.shape[1] == 0:
        return torch.zeros_like(step_returns)
    _, anchor = torch.unique(pair, dim=1, return_inverse=True)
    g = step_returns[valid]
    dev = ops.group_centered(g, anchor)
    adv = _normalise(dev, ops.group_std(g, anchor), scale, eps)
    adv = torch.where(ops.group_count(anchor, torch.float64) > 1, adv, torch.zeros_like(adv))
    out = torch.zeros_like(step_returns)
    out[valid] = adv
    return out


@ADVANTAGES.register("gigpo", paper="Group-in-Group Policy Optimization for LLM Agent Training", arxiv="2505.10978")
@dataclass(frozen=True)
class GiGPOAdvantage:
    """A^E(tau_i) + omega * A^S(a_t^(i)): episode groups plus anchor-state step groups (arXiv:2505.10978 Eqs. 3-8).

    Args:
        step_weight: omega, the weight of the step-level advantage (scripts: 1.0).
        gamma: discount of the step returns (scripts: 0.95).
        norm: F_norm: "mean" (1, the scripts' mean_norm) or "mean_std" (the group's std).
        episode_stats: "trajectories" (the paper) or "steps" (the released code's default weighting).
        singleton: an episode group of one: "zero" (A^E = 0) or "raw" (verl-agent: its return).
        eps: added to F_norm = std.
    """

    step_weight: float = hp(1.0, ge=0)
    gamma: float = hp(0.95, ge=0, le=1)
    norm: str = hp("mean", choices=("mean", "mean_std"))
    episode_stats: str = hp("trajectories", choices=("trajectories", "steps"))
    singleton: str = hp("zero", choices=("zero", "raw"))
    eps: float = hp(1e-6, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset()

    def components(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        """(A^E (B,), A^S (B, M)) of the batch, float64."""
        scale = self.norm == "mean_std"
        R = outcome_returns(batch)
        n, rewards = turn_layout(batch, R)
        weights = n.clamp_min(1) if self.episode_stats == "steps" else torch.ones_like(n)
        a_e = episode_advantage(R, batch.group_ids, weights, scale=scale, eps=self.eps, singleton=self.singleton)
        keys = batch.extras.get(OBSERVATION_KEYS)
        if keys is None:  # no observed states: no anchor groups
            return a_e, torch.zeros_like(rewards)
        M = rewards.shape[1]
        keys = keys.to(rewards.device)[:, :M]
        valid = played(n, M) & (keys != 0)
        G = discounted_turn_returns(rewards, n, self.gamma)
        return a_e, step_advantage(G, keys, batch.group_ids, valid, scale=scale, eps=self.eps)

    def __call__(self, batch: RolloutBatch) -> Tensor:
        a_e, a_s = self.components(batch)
        return turns_to_tokens(a_e[:, None] + self.step_weight * a_s, batch)


# verl-agent's GiGPO scripts (ALFWorld/WebShop): omega = 1, gamma = 0.95, mean_norm; PPO clip 0.2 with verl's
# token-mean loss; KL as a loss with k3 ("low_var_kl") and coefficient 0.01.
PRESETS = {
    "gigpo": {
        "advantage": {"name": "gigpo", "step_weight": 1.0, "gamma": 0.95, "norm": "mean"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.01, "estimator": "k3", "mode": "loss"},
    },
}
