"""REINFORCE++: reward-to-go with global batch whitening.

Paper: Hu et al. 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward Models",
arXiv:2501.03262, Sec. 3 (Eqs. 3-5). Token return G_t = sum_{s >= t} r_s with r_s = -beta*KL_s for s < T and the
outcome reward added at the last token (gamma = 1); the advantage is the return whitened over *all valid tokens of
the global batch*: A_t = (G_t - mean) / (std + eps). Differs from GRPO: no per-prompt group statistics (robust to
prompt-set difficulty), and token-level KL enters the return. With ``baseline="group_mean"`` the group mean of the
outcome is subtracted first ("REINFORCE++-baseline", Sec. 3.3).

In lmpo the per-token KL terms arrive in ``batch.token_rewards`` (set by the loop when ``kl.mode=reward``), so the
return-to-go is ``R + reverse_cumsum(token_rewards)``.

Discounting (``gamma``, Eq. 3's gamma; the paper uses 1): G_t = sum_{s >= t} gamma^(s - t) r_s with the outcome
reward at the row's last trained token, so G_t = gamma^(last - t) R + sum_{s >= t} gamma^(s - t) token_rewards_s.
The exponent counts positions (a masked position inside a response, e.g. a tool's output, is a time step too).
verl's ``compute_reinforce_plus_plus_outcome_advantage`` does the same on right-padded rows.

Conventions against verl (tests/unit/test_peer_parity.py): a singleton group under ``baseline="group_mean"`` gets
R - R = 0 here and R - 0 in verl's ``reinforce_plus_plus_baseline`` (``singleton="raw"`` reproduces verl). verl's
baseline variant broadcasts the centred *sum* of all token rewards instead of a reward-to-go; with no token rewards
(KL in the loss, as verl runs it) the two agree. The whitening is (x - mean) / (std + eps) here and
(x - mean) * rsqrt(var + 1e-8) in verl: equal to ~1e-8 relative.
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


def returns_to_go(batch: RolloutBatch, outcome: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = gamma^(last - t) outcome + sum_{s >= t} gamma^(s - t) token_rewards_s over valid tokens, (B, T)."""
    mask = batch.response_mask
    if gamma == 1.0:
        g = outcome[:, None].to(torch.float32).expand(mask.shape).clone()
        if batch.token_rewards is not None:
            tr = ops.zero_outside(batch.token_rewards.float(), mask)
            g = g + tr.flip(-1).cumsum(-1).flip(-1)
        return ops.zero_outside(g, mask)
    B, T = mask.shape
    pos = torch.arange(T, device=mask.device)
    last = torch.where(mask, pos, torch.full_like(pos, -1)).amax(-1)  # (B,) last trained position (-1: none)
    steps = (last[:, None] - pos[None, :]).clamp_min(0).double()
    g = outcome[:, None].double() * torch.pow(torch.tensor(gamma, dtype=torch.float64), steps)
    if batch.token_rewards is not None:
        tr = ops.zero_outside(batch.token_rewards.double(), mask)
        run = torch.zeros(B, dtype=torch.float64, device=mask.device)
        disc = torch.empty_like(tr)
        for t in range(T - 1, -1, -1):
            run = tr[:, t] + gamma * run
            disc[:, t] = run
        g = g + disc
    return ops.zero_outside(g.float(), mask)


@ADVANTAGES.register("reinforce_pp", paper="REINFORCE++", arxiv="2501.03262")
@dataclass(frozen=True)
class ReinforcePPAdvantage:
    """Batch-whitened reward-to-go A_t = whiten_batch(G_t); arXiv:2501.03262 Eqs. 3-5.

    Args:
        baseline: "none" (REINFORCE++) or "group_mean" (REINFORCE++-baseline: subtract the group mean outcome).
        eps: added to the batch std.
        gamma: discount of the return (Eq. 3); 1 = undiscounted, the paper's setting.
        singleton: with ``baseline="group_mean"``, a group of one gets 0 ("zero") or its raw reward ("raw", verl).
    """

    baseline: str = hp("none", choices=("none", "group_mean"))
    eps: float = 1e-8
    gamma: float = hp(1.0, ge=0, le=1)
    singleton: str = hp("zero", choices=("zero", "raw"))
    needs: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, batch: RolloutBatch) -> Tensor:
        r = batch.rewards.float()
        if self.baseline == "group_mean":
            centred = ops.group_centered(r, batch.group_ids)
            if self.singleton == "raw":  # verl: a group of one has mean 0
                centred = torch.where(ops.group_count(batch.group_ids, r.dtype) == 1, r, centred)
            r = centred
        g = returns_to_go(batch, r, self.gamma)
        return ops.masked_whiten(g, batch.response_mask, eps=self.eps)
