"""Knapsack RL: per-prompt rollout budgets chosen by a knapsack over the prompts' expected learning value.

Paper: Li et al. 2025, "Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation",
arXiv:2509.25849 (Sec. 3, Eq. 5-7; the fallback rules follow the released code's description).

Each prompt i of a batch is a knapsack item whose weight is its number of rollouts N_i and whose value is the
expected learning signal of GRPO with N_i rollouts at success rate p_i:
    Value(N, p) = (1 - p^N - (1 - p)^N) * InfoGain(p),   InfoGain(p) = p (1 - p)^2,                     (Eq. 6-7)
    maximise  sum_i Value(N_i, p_i)  s.t.  sum_i N_i <= N_total,  N_low <= N_i <= N_up.                (Eq. 5)
N_total = (number of prompts) x rollout.num_generations, so the batch costs as much as uniform GRPO. The problem is
solved exactly by a multiple-choice-knapsack dynamic programme over (item, budget). Allocation rules:
unvisited prompts get the nominal N; prompts whose last success rate was 0 or 1 get N_low; prompts with
p in (0, 1) compete in the DP for the rest; budget the DP leaves unused (all items at N_up) goes to p = 0 prompts
(round-robin, bounded only by the budget; with no p = 0 prompt it stays unspent). p_i is the success rate (reward >= ``success_threshold``) of the prompt's last visit.

What differs from GRPO: only how many rollouts each prompt gets (groups of unequal size); advantage and loss are
GRPO's (``knapsack_grpo`` preset). Gaps filled: the paper's optional cost model (alpha = 0.9 probability-based
cost) is not used (cost = number of rollouts); ``max_n = None`` means N_up = the nominal N (the released code's
default), so the DP never gives a mixed prompt more than N and the surplus moves to unsolved (p = 0) prompts.
This component is a planner (``planners: [{name: knapsack}]``): it provides the ``allocate`` extension point
(:class:`~lmpo.methods.base.BudgetAllocator`) and ``observe`` (:class:`~lmpo.methods.base.StepObserver`, the
success-rate memory, saved in checkpoints as its :class:`~lmpo.methods.base.Stateful` state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from lmpo.batch import RolloutBatch
from lmpo.methods.base import Stateful
from lmpo.registry import PLANNERS
from lmpo.methods.params import Rule, hp, ordered


def knapsack_value(n: Tensor | float, p: Tensor | float) -> Tensor:
    """Value(N, p) = (1 - p^N - (1-p)^N) p (1-p)^2 (arXiv:2509.25849 Eq. 6-7), float64."""
    n, p = torch.as_tensor(n, dtype=torch.float64), torch.as_tensor(p, dtype=torch.float64)
    return (1 - p**n - (1 - p) ** n) * p * (1 - p) ** 2


def solve_knapsack(p: list[float], budget: int, lo: int, hi: int) -> list[int]:
    """Exact argmax of sum_i Value(N_i, p_i) s.t. sum N_i <= budget, lo <= N_i <= hi (DP over items x budget)."""
    k = len(p)
    if k == 0:
        return []
    if budget < k * lo:
        raise ValueError(f"budget {budget} cannot give {k} prompts {lo} rollouts each")
    choices = torch.arange(lo, hi + 1)  # (C,)
    neg = torch.tensor(float("-inf"), dtype=torch.float64)
    best = torch.full((budget + 1,), float("-inf"), dtype=torch.float64)
    best[0] = 0.0
    picks = []
    spent = torch.arange(budget + 1)
    for pi in p:
        vals = knapsack_value(choices, pi)  # (C,)
        prev = spent[:, None] - choices[None, :]  # budget before adding this item
        cand = torch.where(prev >= 0, best[prev.clamp_min(0)] + vals[None, :], neg)  # (budget+1, C)
        best, arg = cand.max(1)
        picks.append(arg)
    b = int(best.argmax())  # best total over any spend <= budget (ties: the smallest spend)
    out = [0] * k
    for i in range(k - 1, -1, -1):
        n = int(choices[picks[i][b]])
        out[i] = n
        b -= n
    return out


@PLANNERS.register("knapsack", paper="Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation",
                    arxiv="2509.25849")
@dataclass
class KnapsackAllocation(Stateful):
    """Allocate each prompt's rollouts by a knapsack over Value(N, p) (arXiv:2509.25849 Eq. 5-7).

    Args:
        min_n: N_low, the fewest rollouts a prompt gets (2 in the released code).
        max_n: N_up for the DP (None = rollout.num_generations, the released code's default).
        success_threshold: a rollout counts as a success when its reward >= this.
    """

    min_n: int = hp(2, ge=1)
    max_n: int | None = None
    success_threshold: float = 1.0
    constraints: ClassVar[tuple[Rule, ...]] = (ordered("min_n", "max_n"),)

    def initial_state(self) -> dict[str, Any]:
        return {"success": {}}  # prompt key -> success rate of its last visit

    def allocate(self, keys: list[str], n: int) -> list[int]:
        """Rollouts per prompt for one batch of prompt ``keys``; ``n`` is the nominal per-prompt count."""
        total, lo = n * len(keys), min(self.min_n, n)
        hi = n if self.max_n is None else self.max_n
        rates = [self.state["success"].get(k) for k in keys]
        counts = [n if r is None else lo for r in rates]
        mixed = [i for i, r in enumerate(rates) if r is not None and 0.0 < r < 1.0]
        rest = total - sum(c for i, c in enumerate(counts) if i not in mixed)
        for i, c in zip(mixed, solve_knapsack([rates[i] for i in mixed], rest, lo, max(lo, hi))):
            counts[i] = c
        leftover, zeros = total - sum(counts), [i for i, r in enumerate(rates) if r == 0.0]
        for j in range(leftover if zeros else 0):  # the fallback: unused budget to unsolved prompts, round-robin
            counts[zeros[j % len(zeros)]] += 1
        return counts

    def observe(self, batch: RolloutBatch, logprobs_fn: Callable | None = None) -> None:
        """Remember each prompt's success rate in this batch (its rate for the next allocation)."""
        if not batch.meta:
            return
        hits: dict[str, list[float]] = {}
        for m, r in zip(batch.meta, batch.rewards.tolist()):
            hits.setdefault(m["prompt_key"], []).append(float(r >= self.success_threshold))
        self.state["success"].update({k: sum(v) / len(v) for k, v in hits.items()})


PRESETS = {
    # Knapsack RL on top of GRPO (arXiv:2509.25849): N_low = 2, budget = prompts x num_generations, GRPO loss as is.
    "knapsack_grpo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "planners": [{"name": "knapsack", "min_n": 2}],
        "kl": {"beta": 0.0},
    },
}
