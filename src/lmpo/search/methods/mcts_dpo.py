"""MCTS-DPO: Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning.

Xie, Goyal, Zheng, Kan, Lillicrap, Kawaguchi, Shieh (2024), arXiv:2405.00451; code: github.com/YuxiXie/MCTS-DPO.

Each iteration (section numbers as we recall them from arXiv v2, not re-verified): MCTS over reasoning steps with
the current policy (Sec. 2.1: PUCT selection
a* = argmax Q(s,a) + c_puct p(a|s) sqrt(N(s)) / (1 + N(s,a)), p the policy prior; expansion of ``k_root`` steps at the
root and ``k`` below; evaluation of a new node by its outcome, or by a rollout; Q = mean backed-up return); then
step-level pairs at the visited nodes (Sec. 2.2): the child with the highest Q is preferred to the one with the lowest
Q, both continuing the same prefix; then DPO on the pairs (Eq. of Rafailov et al., per step:
-log sigmoid(beta [log pi(y_w|x,s)/pi_ref(y_w|x,s) - log pi(y_l|x,s)/pi_ref(y_l|x,s)])) with pi_ref the policy of the
previous iteration (on-policy, Sec. 3), through the registered preference loss ``dpo``.

Fidelity: ``reconstructed``. What the code does and we follow: pairs only along the path the search commits to
(the most visited child at each node, ``pairs_along="path"``; ``"all"`` takes every visited node), the best child
against the worst (``choose_worst``; the code's alternative is the second best), step log-probs summed over the
step's tokens, beta = 0.1 (the MathQA script's scale_coeff), k_root = 4, k = 2, depth 3. What we leave out: the
stepwise self-evaluation term lambda C(s) of the node reward (R = outcome + lambda * self-eval; here the exact
checker's outcome only, or any ``value`` function the caller gives the engine) and the adaptive label smoothing of
the paper's text (the released trainer uses plain DPO, which we use). The code commits to one step after each
batch of ``n_iters`` simulations and searches again from there; we run one search with the whole budget and read
the committed path from visit counts, which gives the same pairs when the budget is spent in the same places.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from lmpo.errors import ConfigError
from lmpo.registry import PREFERENCE_LOSSES, SEARCH_RECIPES
from lmpo.search.engine import SearchConfig
from lmpo.search.train import preference_update
from lmpo.search.tree import StepPair, Tree


def committed_path(tree: Tree) -> list[int]:
    """Node ids from the root following the most visited child (ties: the earlier child)."""
    path = [0]
    while tree.nodes[path[-1]].children:
        kids = tree.nodes[path[-1]].children
        path.append(max(kids, key=lambda c: tree.nodes[c].visits))
    return path


def mcts_pairs(tree: Tree, along: str = "path", choose_worst: bool = True, min_gap: float = 0.0) -> list[StepPair]:
    """MCTS-DPO's step pairs: at each node on the committed path (or every node), max-Q child over min-Q child
    (``choose_worst``) or over the second best."""
    nodes = committed_path(tree) if along == "path" else range(len(tree.nodes))
    out = []
    for i in nodes:
        kids = sorted((tree.nodes[c] for c in tree.nodes[i].children if tree.nodes[c].visits),
                      key=lambda n: (n.q, n.visits))
        if len(kids) < 2:
            continue
        best, worst = kids[-1], (kids[0] if choose_worst else kids[-2])
        if best.q - worst.q > min_gap and best.action != worst.action:
            out.append(StepPair(tree.nodes[i].prefix, best.action, worst.action, best.q, worst.q, best.visits,
                                worst.visits, tree.nodes[i].depth))
    return out


@SEARCH_RECIPES.register("mcts_dpo", paper="Monte Carlo Tree Search Boosts Reasoning via Iterative Preference "
                         "Learning", arxiv="2405.00451", fidelity="reconstructed")
@dataclass
class MCTSDPO:
    """MCTS -> step pairs (max-Q vs min-Q sibling) -> step-level DPO, with the previous iteration as reference."""

    search: SearchConfig = field(default_factory=lambda: SearchConfig(algorithm="mcts", k_root=4, k=2, max_depth=3,
                                                                       c_puct=1.0, budget=64))
    beta: float = 0.1
    loss: str = "dpo"
    pairs_along: str = "path"
    choose_worst: bool = True
    min_gap: float = 0.0
    ref_per_iteration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.search.algorithm != "mcts":
            raise ConfigError(f"mcts_dpo: search.algorithm must be mcts, got {self.search.algorithm!r}.")
        if self.pairs_along not in ("path", "all"):
            raise ConfigError(f'mcts_dpo: pairs_along must be "path" or "all", got {self.pairs_along!r}.')
        self._loss = PREFERENCE_LOSSES.build(self.loss, where="mcts_dpo.loss", beta=self.beta)

    def extract(self, tree: Tree) -> list[StepPair]:
        return mcts_pairs(tree, self.pairs_along, self.choose_worst, self.min_gap)

    def update(self, model, ref, tokenizer, optimizer, pairs: list[StepPair]) -> dict[str, float]:
        return preference_update(model, ref, tokenizer, optimizer, pairs, self._loss)
