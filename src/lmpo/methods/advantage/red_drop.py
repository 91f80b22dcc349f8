"""RED-Drop: shape the data by dropping surplus negative responses before the group-relative REINFORCE update.

Paper: Yao, Chen, Sun, Chen, Zhang, Pan, Li, Ding 2025, "Group-Relative REINFORCE Is Secretly an Off-Policy
Algorithm: Demystifying Some Myths About GRPO and Its Friends", arXiv:2509.24203 (the RED family: "regularise by data
shaping"; REC and REP live in ``methods/loss/rec.py``).

The paper's off-policy reading of group-relative REINFORCE says the update stays valid for any sampling distribution,
so which responses enter the update is a free design choice. RED-Drop balances each group: with R the outcome return,
m = mean_g R, a response is *positive* when R_i >= m. If a group has more negatives than positives
(n_neg > n_pos), n_neg - n_pos negatives are dropped, and the baseline is recomputed on what is kept (K):
    A_i = R_i - mean_{j in K} R_j                       (i in K; divided by the population std over K when
    A_i = 0                                             (i dropped)      ``scale_by_std``, eps added)
Groups with at least as many positives as negatives are untouched (plain Dr.GRPO/REINFORCE mean baseline).

Source of the exact rule: the paper's text does not spell it out; the rule above is the authors' released
configuration ("drop: balance" of the REC advantage in Trinity-RFT's ``examples/rec_gsm8k``), read there:
negatives are chosen uniformly at random; a dropped response stays in the batch with advantage 0 (its tokens still
count in a token-mean denominator); a group left with one kept row uses baseline 0 (A = R). Our only change: the
random choice is a fixed hash of each response's tokens (``ops.token_hash``), so the same batch always drops the same
rows, independent of row order and of any global RNG state.

Differs from GRPO: no std division by default, and the surplus negatives of a mostly-failing group carry no gradient,
so positive and negative samples in every group are balanced in number.
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


def balance_keep_mask(returns: Tensor, group_ids: Tensor, key: Tensor) -> Tensor:
    """(B,) bool: rows kept after dropping, per group, the surplus negatives with the smallest ``key``."""
    mean = ops.group_mean(returns, group_ids)
    pos = returns >= mean
    n_pos = ops.group_sum(pos.float(), group_ids)
    n_neg = ops.group_count(group_ids) - n_pos
    surplus = (n_neg - n_pos).clamp(min=0)
    # negatives rank first (by key), positives after them: a negative is dropped when its rank is below the surplus
    order_key = key.double() + pos.double() * 2.0**40
    rank = ops.rank_in_group(order_key, torch.arange(returns.numel(), device=returns.device), group_ids)
    return pos | (rank.to(surplus.dtype) >= surplus)


@ADVANTAGES.register("red_drop", paper="Group-Relative REINFORCE Is Secretly an Off-Policy Algorithm (RED-Drop)",
                     arxiv="2509.24203")
@dataclass(frozen=True)
class REDDropAdvantage:
    """RED-Drop (arXiv:2509.24203, RED family): drop a group's surplus negatives, mean baseline over the kept rows.

    Args:
        scale_by_std: divide by the kept rows' population std (+eps), as the released code does when asked.
        eps: added to the std.
        seed: seed of the per-response hash that picks which negatives are dropped.
    """

    scale_by_std: bool = False
    eps: float = 1e-6
    seed: int = 0
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = outcome_returns(batch)
        key = ops.token_hash(batch.response_ids, batch.response_mask, self.seed)
        keep = balance_keep_mask(r, batch.group_ids, key)
        k = keep.float()
        n_keep = ops.group_sum(k, batch.group_ids)
        single = n_keep <= 1
        mean = torch.where(single, torch.zeros_like(r), ops.group_sum(r * k, batch.group_ids) / n_keep.clamp(min=1))
        adv = r - mean
        if self.scale_by_std:
            var = ops.group_sum((r - mean) ** 2 * k, batch.group_ids) / n_keep.clamp(min=1)
            adv = adv / torch.where(single, torch.ones_like(var), var.sqrt() + self.eps)
        return broadcast(ops.zero_outside(adv, keep), batch.response_mask)


# arXiv:2509.24203 / released RED-Drop config: no clipping, no IS weight, no regulariser, no std normalisation.
PRESETS = {
    "red_drop": {
        "advantage": {"name": "red_drop"},
        "loss": {"name": "rec", "clip_mode": "none", "weight": "none"},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
