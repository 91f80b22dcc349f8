"""BRPO (AnytimeReasoner): dense rewards from truncated replies and a budget-relative baseline.

Paper: Qi et al. 2025, "Optimizing Anytime Reasoning via Budget Relative Policy Optimization", arXiv:2505.13438
(Sec. 3-4). Each reply is cut at budgets b_0 < ... < b_{S-1} (the rollout hook ``prefix_budgets`` scores every
reply truncated there: r_{g,s} = reward of its first b_s tokens), and the objective is the prior-weighted accuracy
J = sum_s p_s E[r_s] (anytime reasoning). Tokens of segment s, positions (b_{s-1}, b_s], get
    R_{g,s} = sum_{s' >= s} p_{s'} r_{g,s'}                                      (future prior-weighted return)
    V2_s = mean_{g' in group} R_{g',s}                                          (GRPO-like group baseline)
    V1_{g,s} = [sum_{j<s} 2^j r_{g,j} / sum_{j<s} 2^j] * sum_{s' >= s} p_{s'}   (the trace's own earlier accuracy)
    B_{g,s} = (s V1_{g,s} + (S - s) V2_s) / S,    A_{g,s} = R_{g,s} - B_{g,s}   (no std normalisation)
Priors: uniform (p_s = 1/S), linear (p_s proportional to b_s) or base (all mass on the last budget).
Differs from GRPO: per-segment advantages from rewards at several budgets (dense credit along the reply), and a
baseline that mixes the group mean with the trace's own accuracy at earlier budgets. With S = 1 it is
A = r - mean_group r (Dr. GRPO).
Gaps filled: the paper forces a short summary ("**Final Answer**", A = 4 samples of <= 128 tokens) at each cut and
trains those summary tokens with their own per-budget baseline; here the truncated reply itself is scored (no
summary generation), so there are no separate summary tokens. Budgets are the paper's (2000..8000 of 8000) scaled
to ``horizon`` (rollout.max_new_tokens). Without ``extras["prefix_rewards"]`` the outcome return is used (S = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.errors import ConfigError
from lmpo.methods.advantage.grpo import outcome_returns
from lmpo.methods.params import Rule, hp, rule
from lmpo.registry import ADVANTAGES

PRIORS = ("uniform", "linear", "base")


def budget_prior(budgets: list[int], prior: str) -> Tensor:
    """p_s over the S budgets (sums to 1), float64."""
    b = torch.tensor(budgets, dtype=torch.float64)
    if prior == "uniform":
        return torch.full_like(b, 1.0 / len(budgets))
    if prior == "linear":
        return b / b.sum()
    return torch.nn.functional.one_hot(torch.tensor(len(budgets) - 1), len(budgets)).double()


def brpo_segment_advantages(r: Tensor, group_ids: Tensor, p: Tensor, base: float = 2.0, v2_only: bool = False) -> Tensor:
    """A_{g,s} = R_{g,s} - B_{g,s} (B, S) from per-budget rewards ``r`` (B, S) and the prior ``p`` (S,)."""
    r, p = r.double(), p.double().to(r.device)
    S = r.shape[1]
    tail = p.flip(0).cumsum(0).flip(0)  # sum_{s' >= s} p_{s'}
    R = (r * p).flip(1).cumsum(1).flip(1)
    V2 = torch.stack([ops.group_mean(R[:, s], group_ids) for s in range(S)], 1)
    if v2_only:
        return R - V2
    w = base ** torch.arange(S, dtype=torch.float64, device=r.device)
    past = torch.cat([torch.zeros_like(r[:, :1]), (r * w).cumsum(1)[:, :-1]], 1)  # sum_{j<s} 2^j r_j
    norm = torch.cat([torch.ones(1, dtype=torch.float64, device=r.device), w.cumsum(0)[:-1]])
    s = torch.arange(S, dtype=torch.float64, device=r.device)
    V1 = past / norm * tail * (s > 0)
    return R - (s * V1 + (S - s) * V2) / S


@ADVANTAGES.register("brpo", paper="Optimizing Anytime Reasoning via Budget Relative Policy Optimization",
                     arxiv="2505.13438", fidelity="reconstructed")
@dataclass(frozen=True)
class BRPOAdvantage:
    """Budget-relative per-segment advantage over rewards of truncated replies (arXiv:2505.13438).

    Args:
        budgets: thinking budgets b_s in the paper's tokens, increasing; scaled so the last equals ``horizon``.
        prior: "uniform", "linear" or "base" weighting of the budgets.
        base: discount base of the V1 weights (2 in the paper).
        variance_reduction: "brpo" (the mixed baseline) or "v2only" (group mean only).
        horizon: generation budget; filled from rollout.max_new_tokens.
    """

    budgets: tuple[int, ...] = hp((2000, 4000, 6000, 8000), gt=0)
    prior: str = hp("uniform", choices=PRIORS)
    base: float = hp(2.0, gt=0)
    variance_reduction: str = hp("brpo", choices=("brpo", "v2only"))
    horizon: int | None = hp(None, ge=1)
    needs: ClassVar[frozenset[str]] = frozenset()
    constraints: ClassVar[tuple[Rule, ...]] = (
        rule(lambda budgets: len(budgets) > 0 and all(a < b for a, b in zip(budgets, budgets[1:])),
             "{budgets} must be a non-empty increasing list"),
    )

    def prefix_budgets(self) -> list[int]:
        """Cut points in tokens: the paper's budgets scaled to the horizon (distinct, at least 1 token)."""
        if self.horizon is None:
            return list(self.budgets)
        scaled = [max(1, round(b * self.horizon / self.budgets[-1])) for b in self.budgets]
        return sorted(set(scaled))

    def __call__(self, batch: RolloutBatch) -> Tensor:
        mask = batch.response_mask
        T = mask.shape[1]
        if "prefix_rewards" in batch.extras:
            r, cuts = batch.extras["prefix_rewards"], self.prefix_budgets()
            if r.shape[1] != len(cuts):
                raise ConfigError(f"advantage brpo: extras['prefix_rewards'] has {r.shape[1]} budgets, expected {len(cuts)}.")
        else:
            r, cuts = outcome_returns(batch)[:, None], [T]
        p = budget_prior(cuts, self.prior)
        adv = brpo_segment_advantages(r, batch.group_ids, p, self.base, self.variance_reduction == "v2only")
        pos = torch.arange(T, device=mask.device)
        seg = torch.searchsorted(torch.tensor(cuts, device=mask.device), pos, right=True).clamp_max(len(cuts) - 1)
        per_token = adv.float().to(mask.device)[:, seg]
        return ops.zero_outside(per_token, mask)


PRESETS = {
    # AnytimeReasoner (arXiv:2505.13438): S = 4 budgets, uniform prior, base-2 V1 weights, PPO-clip, no KL, G = 8.
    "brpo": {
        "advantage": {"name": "brpo", "budgets": [2000, 4000, 6000, 8000], "prior": "uniform"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "rollout": {"num_generations": 8},
        "kl": {"beta": 0.0},
    },
}
