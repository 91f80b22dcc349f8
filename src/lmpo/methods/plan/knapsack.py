"""Knapsack RL: per-prompt rollout budgets chosen by a knapsack over the prompts' expected learning value.

Paper: Li et al. 2025, "Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation",
arXiv:2509.25849 (Sec. 3, Eq. 5-7); the allocation rules, fallbacks and defaults follow the authors' released code
(``sampling_budget_by_knapsack`` and its launch scripts), which issue 21 checked lmpo against.

Each prompt i of a batch is a knapsack item whose weight is its number of rollouts N_i and whose value is the
expected learning signal of GRPO with N_i rollouts at success rate p_i:
    Value(N, p) = (1 - p^N - (1 - p)^N) * InfoGain(p),   InfoGain(p) = p (1 - p)^2,                     (Eq. 6-7)
    maximise  sum_i Value(N_i, p_i)  s.t.  sum_i N_i = N_total,  N_low <= N_i <= N_up.                 (Eq. 5)
N_total = (number of prompts) x rollout.num_generations, so the batch costs as much as uniform GRPO, and the whole
budget is always spent (the released code asserts it).

Success rates (the released code's prompt memory): every visit appends the prompt's rollouts' successes (reward >=
``success_threshold``) to a per-prompt buffer holding the last ``buffer_size`` = 16; p_i is the buffer's mean, and a
prompt is *trusted* once it holds ``min_samples`` = 8 samples. Allocation, in the released code's order:
1. an untrusted prompt gets the nominal N; a trusted prompt gets N_low (p = 0, p = 1 and mixed prompts alike).
2. cost model (the paper's probability-based cost, alpha = 0.9): a mixed prompt (0 < p < 1) needs about
   c_i = log(1 - alpha) / log(max(p, 1 - p)) rollouts to see both outcomes with probability alpha
   (``cost="expectation"``: 1 / (p (1 - p)) - 1). When sum_i int(min(N_up, c_i)) is below the budget left after
   step 1, the surplus goes to the p = 0 prompts (or, with none, to every prompt that is not mixed), spread evenly,
   the first ones in batch order taking the remainder; the DP then gets the estimated cost as its budget.
3. the DP gives each mixed prompt k = 0 .. N_up - N_low extra rollouts, filling its budget exactly when it can
   (else as much as the caps allow, the rest spread evenly over the mixed prompts, which may take them above N_up);
   as in the released DP, k = 0 is worth 0 (not Value(N_low, p)) and k >= 1 is worth Value(N_low + k, p); ties keep
   the smallest k.
4. with no mixed prompt, the budget left after step 1 goes to the p = 0 prompts evenly (with none: every prompt
   gets the nominal N).

Issue 21 (fixed): lmpo capped N_up at N (the released script allows 128; the paper reports up to 93 rollouts on one
prompt), left unspent budget unless a prompt had p = 0 (p = (0.05, 0.5, 1, 1), N = 8, budget 32 gave [8, 8, 2, 2],
20 of 32), had no cost-model fallback, and took p from the last visit only. ``max_n = None`` (N_up = N) is the
released function's default when no cap is passed and stays available; ``fallback=False`` is the code's
``allow_fallback`` switch. Gaps filled: when every prompt is mixed and the cost estimate is below the budget, the
released code divides by zero; we skip the fallback and let the DP take the whole budget. Values are float64 (the code
mixes float32 rates into float64 sums, which can break exact ties differently).

What differs from GRPO: only how many rollouts each prompt gets (groups of unequal size); advantage and loss are
GRPO's (``knapsack_grpo`` preset). This component is a planner (``planners: [{name: knapsack}]``): it provides the
``allocate`` extension point (:class:`~lmpo.methods.base.BudgetAllocator`) and ``observe``
(:class:`~lmpo.methods.base.StepObserver`, the reward buffers, saved in checkpoints as its
:class:`~lmpo.methods.base.Stateful` state).
"""

from __future__ import annotations

import math
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


def released_dp(p: list[float], budget: int, base: int, extra_max: int) -> list[int]:
    """Extra rollouts k_i in [0, extra_max] per mixed prompt, as the released DP: k = 0 is worth 0, k >= 1 is worth
    Value(base + k, p_i); the spend is exactly min(budget, len(p) * extra_max) (every such total is reachable); ties
    keep the smallest k. Returns the k_i (the caller spreads any budget the caps could not take)."""
    n_items, w_max = len(p), max(0, min(budget, len(p) * extra_max))
    if n_items == 0 or w_max == 0:
        return [0] * n_items
    ks = torch.arange(extra_max + 1)  # (C,)
    spent = torch.arange(w_max + 1)
    best = torch.full((w_max + 1,), float("-inf"), dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for pi in p:
        gain = torch.where(ks > 0, knapsack_value(base + ks, pi), torch.zeros((), dtype=torch.float64))
        prev = spent[:, None] - ks[None, :]
        cand = torch.where(prev >= 0, best[prev.clamp_min(0)] + gain[None, :], torch.tensor(float("-inf"),
                                                                                                 dtype=torch.float64))
        arg = torch.argmax(cand, dim=1)  # the first maximum: the smallest k among ties (the code's strict >)
        best = cand.gather(1, arg[:, None])[:, 0]
        picks.append(arg)
    out, w = [0] * n_items, w_max
    for i in range(n_items - 1, -1, -1):
        out[i] = int(picks[i][w])
        w -= out[i]
    return out


def spread(total: int, n: int) -> list[int]:
    """``total`` split over ``n`` slots as evenly as possible, the first ones taking the remainder."""
    return [total // n + (1 if j < total % n else 0) for j in range(n)]


@PLANNERS.register("knapsack", paper="Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation",
                    arxiv="2509.25849")
@dataclass
class KnapsackAllocation(Stateful):
    """Allocate each prompt's rollouts by a knapsack over Value(N, p), spending the whole budget, as the released
    code does (arXiv:2509.25849 Eq. 5-7).

    Args:
        min_n: N_low, the rollouts of a trusted prompt before the DP (2 in the released code).
        max_n: N_up, the DP's per-prompt cap (released script: 128; None = rollout.num_generations).
        alpha: confidence of the probability-based cost model, c = log(1 - alpha) / log(max(p, 1 - p)).
        cost: "probability" (the paper's, default) or "expectation" (c = 1 / (p (1 - p)) - 1).
        fallback: move budget beyond the cost model's estimate to unsolved prompts (released ``allow_fallback``).
        buffer_size: successes remembered per prompt (the last 16 rollouts).
        min_samples: a prompt is trusted (allocated by its rate) once its buffer holds this many (8).
        success_threshold: a rollout counts as a success when its reward >= this.
    """

    min_n: int = hp(2, ge=1)
    max_n: int | None = hp(128, ge=1)
    alpha: float = hp(0.9, gt=0, lt=1)
    cost: str = hp("probability", choices=("probability", "expectation"))
    fallback: bool = True
    buffer_size: int = hp(16, ge=1)
    min_samples: int = hp(8, ge=1)
    success_threshold: float = 1.0
    constraints: ClassVar[tuple[Rule, ...]] = (ordered("min_n", "max_n"), ordered("min_samples", "buffer_size"))

    def initial_state(self) -> dict[str, Any]:
        return {"rewards": {}}  # prompt key -> its last buffer_size successes (0.0 / 1.0), oldest first

    def rate(self, key: str) -> float | None:
        """The prompt's success rate, or None while it is untrusted (fewer than ``min_samples`` buffered)."""
        buf = self.state["rewards"].get(key, [])
        return sum(buf) / len(buf) if len(buf) >= self.min_samples else None

    def cost_of(self, p: float) -> float:
        if self.cost == "probability":
            return math.log(1 - self.alpha) / math.log(max(p, 1 - p))
        return 1 / (p * (1 - p)) - 1

    def allocate(self, keys: list[str], n: int) -> list[int]:
        """Rollouts per prompt for one batch of prompt ``keys``; ``n`` is the nominal per-prompt count."""
        total, lo = n * len(keys), min(self.min_n, n)
        hi = n if self.max_n is None else max(self.max_n, lo)
        rates = [self.rate(k) for k in keys]
        counts = [n if r is None else lo for r in rates]
        mixed = [i for i, r in enumerate(rates) if r is not None and 0.0 < r < 1.0]
        zeros = [i for i, r in enumerate(rates) if r == 0.0]
        left = total - sum(counts)
        if not mixed:
            if left > 0 and zeros:
                for i, extra in zip(zeros, spread(left, len(zeros))):
                    counts[i] += extra
            elif left > 0:
                counts = [n] * len(keys)
            return counts
        estimate = sum(int(min(hi, self.cost_of(rates[i]))) for i in mixed)
        others = zeros or [i for i in range(len(keys)) if i not in mixed]
        if self.fallback and estimate < left and others:
            for i, extra in zip(others, spread(left - estimate, len(others))):
                counts[i] += extra
            left = estimate
        ks = released_dp([rates[i] for i in mixed], left, lo, hi - lo)
        for i, k in zip(mixed, ks):
            counts[i] += k
        for i, extra in zip(mixed, spread(left - sum(ks), len(mixed))):  # what the caps could not take
            counts[i] += extra
        return counts

    def observe(self, batch: RolloutBatch, logprobs_fn: Callable | None = None) -> None:
        """Append this batch's successes to each prompt's buffer, keeping the last ``buffer_size``."""
        if not batch.meta:
            return
        bufs = self.state["rewards"]
        for m, r in zip(batch.meta, batch.rewards.tolist()):
            buf = bufs.setdefault(m["prompt_key"], [])
            buf.append(float(r >= self.success_threshold))
            del buf[:-self.buffer_size]


PRESETS = {
    # Knapsack RL on top of GRPO (arXiv:2509.25849, released script): N_low = 2, N_up = 128, cost model alpha 0.9,
    # 16-reward buffers trusted after 8 samples, budget = prompts x num_generations (all spent), GRPO loss as is.
    "knapsack_grpo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "planners": [{"name": "knapsack", "min_n": 2, "max_n": 128}],
        "kl": {"beta": 0.0},
    },
}
