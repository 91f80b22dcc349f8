"""HBPO: Hierarchical Budget Policy Optimization: budget sub-groups inside each group, budget-aware reward,
intra- plus inter-sub-group advantage.

Paper: Lyu et al. 2025, "Hierarchical Budget Policy Optimization for Adaptive Reasoning", arXiv:2507.15844
(Sec. 3: hierarchical budget exploration, budget-aware reward, hierarchical advantage).
- Rollouts (the ``plan_group`` rollout hook): the G samples of a prompt are split evenly, in contiguous blocks,
  over K budgets b_k (512, 1024, 2048, 2560 tokens in the paper); sample j of a sub-group is told its budget by a hint
  appended to the prompt and generated with at most ceil(limit_factor * b_k) tokens (1.0 = the budget is a hard cap;
  None = only the rollout's max_new_tokens). ``extras["budget"]`` records b_k.
- Budget-aware reward (shaper ``hbpo_budget``), c = the task reward, n = reply length:
      R = c * f(n, b),  f = 1 for n <= b,  f = max(0, 1 - alpha (n - b) / b) for n > b
- Advantage: A_{k,j} = (R_{k,j} - mu_k) / (sigma_k + eps)  +  (mu_k - mu) / (sigma + eps)
  (intra-sub-group comparison + the sub-group's standing in the whole group; mu_k, sigma_k over sub-group k, mu,
  sigma over the group; unbiased std). Without std scaling the two terms sum to R - mu (GRPO's centred reward).
Differs from GRPO: budget-conditioned sub-groups and a budget-aware reward; the advantage separates "good for this
budget" from "this budget is good for this prompt". Loss: PPO-clip.
Gaps filled (reconstructed from the abstract and figure): the exact reward f, alpha, the std normalisation of each
term and the hint wording were not recovered. We use a flat reward inside the budget, a linear relative overshoot
penalty, each term divided by its own std, and the hint "\\nI will answer the question within {budget} tokens.\\n".
Budgets are the paper's scaled so the largest equals ``horizon`` (rollout.max_new_tokens). Without
``extras["budget"]`` the whole group is one sub-group (then A is GRPO's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.advantage.grpo import broadcast, outcome_returns
from lmpo.methods.params import Rule, hp, rule
from lmpo.registry import ADVANTAGES, SHAPERS


def budget_subgroups(group_ids: Tensor, budget: Tensor | None) -> Tensor:
    """Ids of the (prompt, budget) sub-groups (B,)."""
    if budget is None:
        return group_ids
    b = budget.round().long().to(group_ids.device)
    return group_ids * (int(b.max()) + 1) + b


def formats_with_budget(hint: str) -> bool:
    """True when ``hint.format(budget=...)`` works: ``{budget}`` is the only field the hint uses."""
    try:
        hint.format(budget=1)
    except (KeyError, IndexError, ValueError):
        return False
    return True


@ADVANTAGES.register("hbpo", paper="Hierarchical Budget Policy Optimization for Adaptive Reasoning",
                     arxiv="2507.15844", fidelity="reconstructed")
@dataclass(frozen=True)
class HBPOAdvantage:
    """Intra- plus inter-sub-group advantage over budget sub-groups (arXiv:2507.15844); plans the sub-groups.

    Args:
        budgets: token budgets of the sub-groups (the paper's), scaled so the largest equals ``horizon``.
        hint: text appended to the prompt, ``{budget}`` replaced by the sub-group's budget ("" = no hint).
        limit_factor: generation cap per sample = ceil(limit_factor * budget); None = rollout.max_new_tokens only.
        scale_by_std: divide each term by its std (False: A = R - group mean).
        eps: added to each std.
        horizon: generation budget; filled from rollout.max_new_tokens.
    """

    budgets: tuple[int, ...] = hp((512, 1024, 2048, 2560), gt=0)
    hint: str = "\nI will answer the question within {budget} tokens.\n"
    limit_factor: float | None = hp(1.0, gt=0)
    scale_by_std: bool = True
    eps: float = hp(1e-6, ge=0)
    horizon: int | None = None
    needs: ClassVar[frozenset[str]] = frozenset()
    constraints: ClassVar[tuple[Rule, ...]] = (
        rule(lambda budgets: len(budgets) > 0, "{budgets} must be a non-empty list of token counts"),
        rule(formats_with_budget, "{hint} may only use the {{budget}} field"),
    )

    def scaled_budgets(self) -> list[int]:
        if self.horizon is None:
            return list(self.budgets)
        return [max(1, round(b * self.horizon / max(self.budgets))) for b in self.budgets]

    def plan_group(self, n: int) -> list[dict[str, Any]]:
        """Sample j of n gets budget k = floor(j K / n): an even split in contiguous blocks."""
        budgets = self.scaled_budgets()
        plans = []
        for j in range(n):
            b = budgets[j * len(budgets) // n]
            plan: dict[str, Any] = {"prompt_suffix": self.hint.format(budget=b), "tags": {"budget": float(b)}}
            if self.limit_factor is not None:
                plan["max_new_tokens"] = math.ceil(self.limit_factor * b)
            plans.append(plan)
        return plans

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = outcome_returns(batch).double()
        sub = budget_subgroups(batch.group_ids, batch.extras.get("budget"))
        mu_k, mu = ops.group_mean(r, sub), ops.group_mean(r, batch.group_ids)
        intra, inter = r - mu_k, mu_k - mu
        if self.scale_by_std:
            intra = intra / (ops.group_std(r, sub) + self.eps)
            inter = inter / (ops.group_std(r, batch.group_ids) + self.eps)
        return broadcast(intra + inter, batch.response_mask)


@SHAPERS.register("hbpo_budget", paper="Hierarchical Budget Policy Optimization for Adaptive Reasoning (reward)",
                  arxiv="2507.15844", fidelity="reconstructed")
@dataclass(frozen=True)
class HBPOBudgetReward:
    """R = c * f(n, b): full reward within the budget, linearly less per relative token of overshoot (alpha).

    Reads ``extras["budget"]`` (set by the hbpo advantage's plan); rows without a budget keep their reward.
    """

    alpha: float = hp(1.0, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset()

    def factor(self, lengths: Tensor, budget: Tensor) -> Tensor:
        over = (lengths - budget).clamp_min(0.0) / budget
        return (1.0 - self.alpha * over).clamp_min(0.0)

    def __call__(self, batch: RolloutBatch) -> RolloutBatch:
        if "budget" not in batch.extras:
            return batch
        n = ops.response_lengths(batch.response_attn if batch.response_attn is not None else batch.response_mask)
        f = self.factor(n.to(batch.rewards.dtype), batch.extras["budget"].to(batch.rewards))
        return batch.replace(rewards=batch.rewards * f)


PRESETS = {
    # HBPO (arXiv:2507.15844): 4 budget sub-groups 512/1024/2048/2560 (scaled to the horizon), budget-aware reward,
    # intra + inter sub-group advantage, PPO-clip, no KL.
    "hbpo": {
        "advantage": {"name": "hbpo", "budgets": [512, 1024, 2048, 2560]},
        "shapers": [{"name": "hbpo_budget", "alpha": 1.0}],
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
