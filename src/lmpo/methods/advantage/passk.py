"""Pass@k (k = n) advantage: only the best response of each group learns, by its margin over the runner-up.

The objective is the expected *maximum* reward of the group, E[max_i R_i] (pass@n for 0/1 rewards). Its
leave-one-out policy gradient gives response i the advantage max_j R_j - max_{j != i} R_j, which is
    A_best = R_(1) - R_(2)   for the (first) best response,   A_i = 0 for every other,
with R_(1) >= R_(2) the two largest rewards of the group. This is the k = n case of Walder & Karkhanis 2025,
"Pass@K Policy Optimization: Solving Harder Reinforcement Learning Problems" (arXiv:2505.15201), and verl's
``compute_grpo_passk_outcome_advantage``, which cites arXiv:2503.19595 for it; optionally divided by the group's
std + eps as verl does with ``norm_adv_by_std_in_grpo`` (``scale_by_std``).
Differs from GRPO: a group with two or more best responses, or with all rewards equal, gives no signal at all, and
only one response per group is ever pushed up (none pushed down): the objective rewards covering the problem once.

Conventions: ties for the best are broken by position (the first best row, as ``torch.topk`` in verl picks it),
which does not matter since a tie has margin 0. A group of one has no runner-up: A = 0 here (verl raises).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.advantage.grpo import broadcast, outcome_returns
from lmpo.registry import ADVANTAGES


def group_top2(r: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row (B,): its group's largest value, its group's second largest, and whether the row is the group's best
    (the first row holding the largest value). Second largest of a group of one is -inf."""
    inv, n = ops.group_index(group_ids)
    neg = torch.full((n,), float("-inf"), dtype=r.dtype, device=r.device)
    top = neg.scatter_reduce(0, inv, r, reduce="amax")
    is_top = r == top[inv]
    pos = torch.arange(r.numel(), device=r.device)
    first = torch.full((n,), r.numel(), dtype=torch.long, device=r.device)
    first = first.scatter_reduce(0, inv, torch.where(is_top, pos, torch.full_like(pos, r.numel())), reduce="amin")
    best = pos == first[inv]
    rest = torch.where(best, torch.full_like(r, float("-inf")), r)
    second = neg.scatter_reduce(0, inv, rest, reduce="amax")
    return top[inv], second[inv], best


@ADVANTAGES.register("passk", paper="Pass@K Policy Optimization (k = n: max-reward leave-one-out)",
                     arxiv="2505.15201")
@dataclass(frozen=True)
class PassKAdvantage:
    """A = R_(1) - R_(2) for each group's best response, 0 for the others (pass@n, leave-one-out).

    Args:
        scale_by_std: divide by the group's reward std + eps (verl's ``norm_adv_by_std_in_grpo``).
        eps: added to the std.
    """

    scale_by_std: bool = False
    eps: float = 1e-6
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = outcome_returns(batch).double()
        top, second, best = group_top2(r, batch.group_ids)
        margin = torch.where(best & torch.isfinite(second), top - torch.where(torch.isfinite(second), second, top),
                             torch.zeros_like(r))
        if self.scale_by_std:
            margin = margin / (ops.group_std(r, batch.group_ids) + self.eps)
        return broadcast(margin, batch.response_mask)


PRESETS = {
    # Pass@n training: the best response of each group by its margin over the runner-up, PPO-clip, token mean.
    "passk": {
        "advantage": {"name": "passk"},
        "loss": {"name": "ppo_clip"},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
