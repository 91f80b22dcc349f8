"""REINFORCE++: reward-to-go with global batch whitening.

Paper: Hu et al. 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward Models",
arXiv:2501.03262, Sec. 3 (Eqs. 3-5). Token return G_t = sum_{s >= t} r_s with r_s = -beta*KL_s for s < T and the
outcome reward added at the last token (gamma = 1); the advantage is the return whitened over *all valid tokens of
the global batch*: A_t = (G_t - mean) / (std + eps). Differs from GRPO: no per-prompt group statistics (robust to
prompt-set difficulty), and token-level KL enters the return. With ``baseline="group_mean"`` the group mean of the
outcome is subtracted first ("REINFORCE++-baseline", Sec. 3.3).

In lmpo the per-token KL terms arrive in ``batch.token_rewards`` (set by the loop when ``kl.mode=reward``), so the
return-to-go is ``R + reverse_cumsum(token_rewards)``.
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


def returns_to_go(batch: RolloutBatch, outcome: Tensor) -> Tensor:
    """G_t = outcome + sum_{s >= t} token_rewards_s over valid tokens, (B, T)."""
    mask = batch.response_mask
    g = outcome[:, None].to(torch.float32).expand(mask.shape).clone()
    if batch.token_rewards is not None:
        tr = ops.zero_outside(batch.token_rewards.float(), mask)
        g = g + tr.flip(-1).cumsum(-1).flip(-1)
    return ops.zero_outside(g, mask)


@ADVANTAGES.register("reinforce_pp", paper="REINFORCE++", arxiv="2501.03262")
@dataclass(frozen=True)
class ReinforcePPAdvantage:
    """Batch-whitened reward-to-go A_t = whiten_batch(G_t); arXiv:2501.03262 Eqs. 3-5.

    Args:
        baseline: "none" (REINFORCE++) or "group_mean" (REINFORCE++-baseline: subtract the group mean outcome).
        eps: added to the batch std.
    """

    baseline: str = hp("none", choices=("none", "group_mean"))
    eps: float = 1e-8
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = batch.rewards.float()
        if self.baseline == "group_mean":
            r = r - ops.group_mean(r, batch.group_ids)
        g = returns_to_go(batch, r)
        return ops.masked_whiten(g, batch.response_mask, eps=self.eps)
