"""ReST-GRPO (stage 1 of ReST-RL): keep high-variance groups and assemble partial-solution prompts.

Paper: Zhoubian et al. 2025, "ReST-RL: Achieving Accurate Code Reasoning of LLMs with Optimized Self-Training and
Decoding", arXiv:2508.19576, Sec. 3.1 (ReST-GRPO); defaults from the official data-processing script.
- Filter: a problem q with sampled rewards {R_j} is trained on iff std_j(R_j) >= sigma_min (population std).
- Assembly: if max_j R_j >= R_acc, split the best solution into lines l_1..l_L; the candidate prompts are
  q + (l_1..l_k), k = 1..L; draw m = ceil(rho * L) of them with replacement with P(k) = alpha^(k-1) / sum_k alpha^(k-1)
  (short prefixes favoured). The assembled prompts are trained with GRPO alongside the kept problems.
Stage 2 (value model + MCTS decoding) is out of scope here.

Differs from GRPO: low-variance groups leave the batch (like DAPO's filter, with a threshold) and the training set
grows with partial-state prompts whose continuation is rewarded as prefix + continuation (the rollout stage reads a
row's ``response_prefix`` column: it is appended to the formatted prompt and prepended to the completion for scoring).

Gaps filled: the paper assembles its data set offline, once per round; online, we assemble after each step's
rollouts and serve the queued prompts first through the ``inject_prompts(n)`` rollout hook (oldest first, at most
``max_queue`` kept). Prompts that already carry a prefix are not split again. The small code-specific shaping terms
of the script (symbol reward 1e-3, trailing penalty 1e-6) are not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmpo import ops
from lmpo.batch import RolloutBatch
from lmpo.methods.base import Stateful
from lmpo.methods.params import hp
from lmpo.registry import SELECTORS


def prefix_probs(n_lines: int, alpha: float) -> Tensor:
    """P(k) for k = 1..L: alpha^(k-1), normalised (float64)."""
    w = alpha ** torch.arange(n_lines, dtype=torch.float64)
    return w / w.sum()


@SELECTORS.register("rest_grpo", paper="ReST-RL (ReST-GRPO)", arxiv="2508.19576")
@dataclass
class ReSTGRPO(Stateful):
    """Keep groups with reward std >= ``min_std``; queue partial-solution prompts from high-reward groups.

    Args:
        min_std: sigma_min, the reward-std threshold (0.05).
        accept_reward: R_acc, the best reward needed to assemble prefix prompts (0.9).
        sample_ratio: rho, prefixes drawn per accepted solution = ceil(rho * L) (0.5).
        alpha: decay of P(k) over prefix lengths (0.95).
        max_queue: assembled prompts kept waiting (oldest dropped first).
        seed: seed of the prefix sampler.
    """

    min_std: float = hp(0.05, ge=0)
    accept_reward: float = 0.9
    sample_ratio: float = hp(0.5, gt=0, le=1)
    alpha: float = hp(0.95, gt=0, le=1)
    max_queue: int = hp(256, ge=0)
    seed: int = 0
    needs: ClassVar[frozenset[str]] = frozenset()

    def initial_state(self) -> dict[str, Any]:
        return {"queue": [], "draws": 0}

    def keep(self, batch: RolloutBatch) -> Tensor:
        """(B,) bool: rows of groups whose population reward std is >= min_std."""
        std = ops.group_std(batch.rewards.double(), batch.group_ids, unbiased=False)
        return std >= self.min_std - 1e-12

    def sample_prefixes(self, solution: str) -> list[str]:
        """ceil(rho * L) line prefixes of ``solution`` drawn with P(k) proportional to alpha^(k-1)."""
        lines = solution.splitlines(keepends=True)
        if not lines:
            return []
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.state["draws"])
        self.state["draws"] += 1
        m = math.ceil(self.sample_ratio * len(lines))
        ks = torch.multinomial(prefix_probs(len(lines), self.alpha), m, replacement=True, generator=g) + 1
        return ["".join(lines[:k]) for k in ks.tolist()]

    def assemble(self, batch: RolloutBatch) -> list[dict[str, Any]]:
        """New prompt rows (original row + ``response_prefix``) from groups whose best reward is >= R_acc."""
        if not batch.meta or "row" not in batch.meta[0]:
            return []
        rows = []
        for g in torch.unique(batch.group_ids).tolist():
            idx = (batch.group_ids == g).nonzero(as_tuple=True)[0]
            best = idx[int(batch.rewards[idx].argmax())]
            row = batch.meta[best]["row"]
            if float(batch.rewards[best]) < self.accept_reward or row.get("response_prefix"):
                continue
            rows += [{**row, "response_prefix": p} for p in self.sample_prefixes(batch.meta[best]["completion"])]
        return rows

    def __call__(self, batch: RolloutBatch) -> Tensor:
        new = self.assemble(batch)
        if new and self.max_queue:
            self.state["queue"] = (self.state["queue"] + new)[-self.max_queue:]
        return self.keep(batch)

    def inject_prompts(self, n: int) -> list[dict[str, Any]]:
        """Rollout hook: up to ``n`` assembled prompts, oldest first (removed from the queue)."""
        out, self.state["queue"] = self.state["queue"][:n], self.state["queue"][n:]
        return out




PRESETS = {
    # ReST-GRPO (arXiv:2508.19576): variance filter 0.05, prefix assembly (R_acc 0.9, rho 0.5, alpha 0.95), GRPO.
    "rest_grpo": {
        "advantage": {"name": "grpo"},
        "loss": {"name": "ppo_clip", "epsilon": 0.2},
        "aggregator": {"name": "seq_mean_token_mean"},
        "selectors": [{"name": "rest_grpo", "min_std": 0.05, "accept_reward": 0.9, "sample_ratio": 0.5,
                       "alpha": 0.95}],
        "kl": {"beta": 0.0},
    },
}
