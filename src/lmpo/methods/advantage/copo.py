"""COPO: Consistency-Aware Policy Optimization.

Paper: Han, Chen, Shao et al. 2025, "COPO: Consistency-Aware Policy Optimization", arXiv:2508.04138
(code: hijih/copo-code, not retrievable here). Fidelity: reconstructed from the abstract and a public review;
the paper's exact equations were not available, so every formula below is our reading of them.

When all G responses to a prompt agree (all right or all wrong) GRPO's advantage is 0 and the prompt is wasted.
COPO adds a prompt-level *global* advantage, standardised across the prompts of the batch, and blends it with the
usual *local* (in-group) advantage through a per-prompt entropy gate:

    local   A^loc_{q,i} = (R_{q,i} - mean_i R_q) / (std_i R_q + eps)                       (GRPO)
    global  g_q = mean_i R_{q,i};   A^glob_q = (g_q - mean_{q'} g_{q'}) / (std_{q'} g_{q'} + eps)
    gate    H_q = entropy of the empirical answer distribution of q's G responses, normalised by log G;
            w_q = sigmoid(kappa (H_q - h0))       (w -> 1: diverse answers, explore locally; w -> 0: converged)
    L = sum_q [ w_q L(A^loc_q) + (1 - w_q) L(A^glob_q) ]

Differences from GRPO: uniform groups still get a signal (A^glob), weighted by how consistent the group is.

Gaps filled (guesses):
- The two losses are blended through the advantage, A = w A^loc + (1 - w) A^glob, fed to one clipped surrogate:
  the gradient is identical on-policy (ratio 1) and differs only where the clip is active.
- kappa = 10 and h0 = 0.5 (on the entropy normalised to [0, 1]); std is Bessel-corrected (the card's worked example
  gives A^glob = +0.7071 for g = (1, 0.5)); each prompt counts once in the global statistics.
- "Answer": the ``<answer>`` block or else the stripped completion text from ``batch.meta``; when the batch carries
  no completion text the outcome (reward value) stands for the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.params import hp
from lmpo.registry import ADVANTAGES
from lmpo.rewards.builtin import extract_tag


def answer_keys(batch: RolloutBatch) -> list:
    """One hashable answer per row: the extracted answer text if the batch carries completions, else the reward."""
    if batch.meta and all("completion" in m for m in batch.meta):
        return [(extract_tag(m["completion"]) or m["completion"]).strip() for m in batch.meta]
    return [float(r) for r in batch.rewards.tolist()]


def normalised_answer_entropy(keys: list, group_ids: Tensor) -> Tensor:
    """Per-row entropy (B,) of its group's empirical answer distribution, divided by log(group size) (0 for G = 1)."""
    gids = group_ids.tolist()
    groups: dict = {}
    for g, k in zip(gids, keys):
        groups.setdefault(g, []).append(k)
    ent = {}
    for g, ks in groups.items():
        n = len(ks)
        counts = [ks.count(k) for k in set(ks)]
        h = -sum(c / n * math.log(c / n) for c in counts)
        ent[g] = h / math.log(n) if n > 1 else 0.0
    return torch.tensor([ent[g] for g in gids], dtype=torch.float32)


@ADVANTAGES.register("copo", paper="COPO: Consistency-Aware Policy Optimization", arxiv="2508.04138",
                     fidelity="reconstructed")
@dataclass(frozen=True)
class COPOAdvantage:
    """A = w_q A^loc + (1 - w_q) A^glob with an answer-entropy gate w_q (arXiv:2508.04138, reconstructed).

    Args:
        kappa: gate steepness (> 0).
        h0: gate midpoint on the normalised answer entropy, in [0, 1].
        eps: added to every std.
    """

    kappa: float = hp(10.0, gt=0)
    h0: float = hp(0.5, ge=0, le=1)
    eps: float = hp(1e-6, ge=0)
    needs: ClassVar[frozenset[str]] = frozenset()

    def gate(self, batch: RolloutBatch) -> Tensor:
        """w_q per row (B,)."""
        h = normalised_answer_entropy(answer_keys(batch), batch.group_ids).to(batch.rewards.device)
        return torch.sigmoid(self.kappa * (h - self.h0)).to(batch.rewards.dtype)

    def local_global(self, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
        r = batch.rewards
        if batch.token_rewards is not None:
            r = r + ops.masked_sum(batch.token_rewards, batch.response_mask, dim=-1).to(r.dtype)
        std = ops.group_std(r, batch.group_ids) + self.eps
        # an all-equal group has exactly zero deviations: dividing by 1 keeps eps = 0 finite
        a_loc = ops.group_centered(r, batch.group_ids) / torch.where(std > 0, std, torch.ones_like(std))
        inv, n = ops.group_index(batch.group_ids)
        g = ops.group_mean(r, batch.group_ids)  # g_q on every row of q
        first = torch.zeros(n, dtype=torch.long, device=r.device).scatter_reduce(
            0, inv, torch.arange(r.numel(), device=r.device), reduce="amax", include_self=False)
        g_q = g[first]  # one g per prompt
        if n > 1:
            sd = g_q.double().std().to(r.dtype) + self.eps
            a_glob = (g - g_q.double().mean().to(r.dtype)) / torch.where(sd > 0, sd, torch.ones_like(sd))
        else:
            a_glob = torch.zeros_like(r)
        return a_loc, a_glob

    def __call__(self, batch: RolloutBatch) -> Tensor:
        a_loc, a_glob = self.local_global(batch)
        w = self.gate(batch)
        adv = w * a_loc + (1 - w) * a_glob
        return ops.zero_outside(adv[:, None], batch.response_mask)


# The released README trains in a DAPO-based verl recipe: clip-higher 0.2 / 0.28, token-level mean, no KL.
PRESETS = {
    "copo": {
        "advantage": {"name": "copo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2, "epsilon_high": 0.28},
        "aggregator": {"name": "token_mean"},
        "kl": {"beta": 0.0},
    },
}
