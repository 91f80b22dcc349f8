"""PF-PPO: policy filtration by reward reliability.

Paper: Shen et al. 2024/2025, "Policy Filtration for RLHF to Mitigate Noise in Reward Models" (first title "Policy
Filtration in RLHF to Fine-Tune LLM for Code Generation"), arXiv:2409.06957 (ICML 2025).

A learned reward model is more reliable on some responses than on others (for code: at the high-reward end). PF-PPO
samples N responses per prompt, scores them, and trains only on a filtered subset whose rewards are trustworthy
(Sec. 4). Filters, per prompt group of rewards r_1..r_N:
    best-of-N (BoN):   keep argmax_i r_i
    best-random (BR):  keep the best and one other response drawn uniformly
    best-worst (BW):   keep the best and the worst
The filter is chosen offline by the coefficient of determination between the RM rewards r and the true scores s
(test pass rates) on the filtered samples (Sec. 4.2, Eq. 5): R^2 = 1 - sum_k (s_k - f(r_k))^2 / sum_k (s_k - mean s)^2
with f the least-squares line; BR and BW score highest and train best. ``r_squared`` computes it.

Differences from GRPO: rows are dropped before the advantage, so the update sees only the reliable part of each
group (here a Selector; the advantage and loss are unchanged).

Gaps filled (ours):
- Ties (equal rewards) and the "random" draw of BR use a fixed hash of the response tokens, so the choice does not
  depend on row order (and is the same for identical responses); a singleton group keeps its one row.
- The paper trains PPO with GAE and a critic; lmpo has no critic, so the preset uses REINFORCE++'s critic-free
  batch-whitened returns (with its token-level KL in the reward) as the PPO stand-in.
- verl's variant (multinomial resampling of the whole batch with weights |score|^p) is not a row filter and is not
  implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.params import hp
from lmpo.registry import SELECTORS

STRATEGIES = ("best_worst", "best_random", "best_of_n")


def r_squared(rewards: Tensor, scores: Tensor) -> Tensor:
    """R^2 of the least-squares line s ~ a r + b on (r_k, s_k) pairs (PF-PPO Eq. 5); 1 for an exact affine fit."""
    r, s = rewards.double(), scores.double()
    rc, sc = r - r.mean(), s - s.mean()
    slope = (rc * sc).sum() / (rc * rc).sum()
    resid = sc - slope * rc
    return 1 - (resid * resid).sum() / (sc * sc).sum()


@SELECTORS.register("pf_ppo", paper="Policy Filtration for RLHF to Mitigate Noise in Reward Models (PF-PPO)",
                    arxiv="2409.06957")
@dataclass(frozen=True)
class PolicyFiltration:
    """Keep each group's best response and, per ``strategy``, its worst or one random other (arXiv:2409.06957).

    Args:
        strategy: "best_worst" (BW), "best_random" (BR) or "best_of_n" (BoN).
    """

    strategy: str = hp("best_worst", choices=STRATEGIES)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        gid = batch.group_ids
        n = ops.group_count(gid, torch.float64).long()
        rank = ops.rank_in_group(batch.rewards, ops.token_hash(batch.response_ids, batch.response_mask, 0), gid)
        best = rank == n - 1
        if self.strategy == "best_of_n":
            return best
        if self.strategy == "best_worst":
            return best | (rank == 0)
        # best-random: among the non-best rows, the one with the smallest second hash
        h2 = ops.token_hash(batch.response_ids, batch.response_mask, 1)
        h2 = torch.where(best, torch.full_like(h2, 2**62), h2)
        pick = ops.rank_in_group(h2, rank, gid) == 0
        return best | (pick & ~best)


# Paper: PPO on the filtered samples (verl example: rollout.n = 5). See the docstring for the critic stand-in.
PRESETS = {
    "pf_ppo": {
        "selectors": [{"name": "pf_ppo", "strategy": "best_worst"}],
        "advantage": {"name": "reinforce_pp"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.01, "estimator": "k1", "mode": "reward"},
    },
}
