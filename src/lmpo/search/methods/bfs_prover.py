"""BFS-Prover-V2: Scaling up Multi-Turn Off-Policy RL and Multi-Agent Tree Search for LLM Step-Provers.

Xin, Zheng, Nie, Yuan, Xiao (2025), arXiv:2509.06493 (search from BFS-Prover, arXiv:2502.03438).

Expert iteration (the training-time scaling section): the current policy with best-first tree search attacks the problems; the frontier is
ordered by the path's cumulative log-prob divided by length^alpha (BFS-Prover's length normalisation, which favours
deeper paths); every (state, step) on a found proof path gets reward 1 and becomes a supervised example (off-policy
multi-turn RL = SFT on successful steps); tactic-level filtering keeps the middle of the step-perplexity distribution,
PPL(a|s) = exp(-(1/|a|) sum_j log pi(a_j | s, a_<j)): the low tail (too easy, no signal) and the high tail (noisy)
are dropped; periodically the model is retrained from the base on the curated data.

Here: ``search`` (best_first, ``length_alpha``), success-path steps, a perplexity band given by batch quantiles
(``ppl_quantiles``) and/or absolute bounds (``ppl_min``, ``ppl_max``), and one SFT step per update on the kept pairs.
Fidelity ``reconstructed``: the band's quantiles, alpha and budgets were not read (our defaults: keep the 10-90%
band, alpha 0.5); the periodic retraining from the base and the planner / multi-agent inference are not implemented
(the caller owns the model; :func:`perplexity_band` and :meth:`BFSProverV2.extract` are the data side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from lmpo.errors import ConfigError
from lmpo.registry import SEARCH_RECIPES
from lmpo.search.engine import SearchConfig
from lmpo.search.train import sft_update
from lmpo.search.tree import Tree


def step_perplexity(logprob: float, num_tokens: int) -> float:
    """exp(-mean token log-prob) of one step."""
    return math.exp(-logprob / max(num_tokens, 1))


def perplexity_band(ppls: list[float], quantiles: tuple[float, float] = (0.0, 1.0), lo: float | None = None,
                    hi: float | None = None) -> list[bool]:
    """Which steps to keep: inside the [q_low, q_high] quantiles of ``ppls`` (nearest rank) and inside [lo, hi]."""
    if not ppls:
        return []
    s = sorted(ppls)
    q = [s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))] if p > 0 else s[0] for p in quantiles]
    return [q[0] <= p <= q[1] and (lo is None or p >= lo) and (hi is None or p <= hi) for p in ppls]


@SEARCH_RECIPES.register("bfs_prover_v2", paper="Scaling up Multi-Turn Off-Policy RL and Multi-Agent Tree Search "
                         "for LLM Step-Provers", arxiv="2509.06493", fidelity="reconstructed")
@dataclass
class BFSProverV2:
    """Best-first search -> (prefix, step) pairs on proof paths -> perplexity band -> SFT."""

    search: SearchConfig = field(default_factory=lambda: SearchConfig(algorithm="best_first", k=4, max_depth=4,
                                                                       budget=32, length_alpha=0.5))
    ppl_quantiles: tuple[float, float] = (0.1, 0.9)
    ppl_min: float | None = None
    ppl_max: float | None = None
    ref_per_iteration: ClassVar[bool] = False

    def __post_init__(self) -> None:
        lo, hi = self.ppl_quantiles
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"bfs_prover_v2: ppl_quantiles must satisfy 0 <= low <= high <= 1, got {lo}, {hi}.")
        if self.search.algorithm != "best_first":
            raise ConfigError(f"bfs_prover_v2: search.algorithm must be best_first, got {self.search.algorithm!r}.")

    def proof_steps(self, tree: Tree) -> list[tuple[str, str, float]]:
        """(prefix, step, perplexity) of every step on a path to a success (each edge once)."""
        seen, out = set(), []
        for s in range(len(tree.nodes)):
            if tree.is_success(s):
                for i in tree.path(s)[1:]:
                    if i not in seen:
                        seen.add(i)
                        n = tree.nodes[i]
                        out.append((tree.nodes[n.parent].prefix, n.action, step_perplexity(n.logprob, n.num_tokens)))
        return out

    def extract(self, tree: Tree) -> list[tuple[str, str, float]]:
        return self.proof_steps(tree)

    def filter(self, steps: list[tuple[str, str, float]]) -> list[tuple[str, str]]:
        keep = perplexity_band([p for _, _, p in steps], self.ppl_quantiles, self.ppl_min, self.ppl_max)
        return [(a, b) for (a, b, _), k in zip(steps, keep) if k]

    def update(self, model, ref, tokenizer, optimizer, steps) -> dict[str, float]:
        kept = self.filter(steps)
        if not kept:
            return {"loss": 0.0, "kept": 0.0}
        return {**sft_update(model, tokenizer, optimizer, kept), "kept": float(len(kept))}
