"""TP-LLaMA: Advancing Tool-Augmented Large Language Models: Integrating Insights from Errors in Inference Trees.

Chen, Wang, et al. (NeurIPS 2024), arXiv:2406.07115.

ToolLLaMA trains only on the successful path of a depth-first decision tree (DFSDT). TP-LLaMA also uses the failed
branches: walking the successful path, every node that branched gives a step-wise preference pair (its method
section; the section number was not verified): the
prefix up to the node (instruction, earlier thoughts/actions/observations) as the prompt, the child on the successful
path as the chosen step and a sibling whose subtree failed as the rejected one; nodes off the successful path give
none. The policy (the SFT model) is then trained with DPO (Rafailov et al., Eq. 7) on these pairs with the SFT model
as the fixed reference; step log-probs are summed over the step's tokens (thought + action + input).

Here the inference tree is the engine's ``dfs`` search (children sampled k at a time and tried in order of their
log-prob, backtracking on failure: the DFSDT shape) with the current policy; pairs are
:meth:`lmpo.search.Tree.success_pairs` (only siblings that were tried: terminal or expanded, ``explored_only``);
the loss is the registered ``dpo``. Fidelity ``reconstructed``: the paper mines existing ToolBench trees (offline)
where we search with the policy each iteration, and its beta was not read (TRL's default 0.1 here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from lmpo.errors import ConfigError
from lmpo.registry import PREFERENCE_LOSSES, SEARCH_RECIPES
from lmpo.search.engine import SearchConfig
from lmpo.search.train import preference_update
from lmpo.search.tree import StepPair, Tree


@SEARCH_RECIPES.register("tp_llama", paper="Advancing Tool-Augmented Large Language Models: Integrating Insights "
                         "from Errors in Inference Trees", arxiv="2406.07115", fidelity="reconstructed")
@dataclass
class TPLLaMA:
    """DFS inference tree -> (success-path child, failed sibling) step pairs -> DPO against the fixed SFT model."""

    search: SearchConfig = field(default_factory=lambda: SearchConfig(algorithm="dfs", k=2, max_depth=4, budget=32,
                                                                       max_children=4))
    beta: float = 0.1
    loss: str = "dpo"
    explored_only: bool = True
    ref_per_iteration: ClassVar[bool] = False  # pi_ref = the SFT model throughout

    def __post_init__(self) -> None:
        if self.search.algorithm not in ("dfs", "best_first", "mcts"):
            raise ConfigError(f"tp_llama: unknown search.algorithm {self.search.algorithm!r}.")
        self._loss = PREFERENCE_LOSSES.build(self.loss, where="tp_llama.loss", beta=self.beta)

    def extract(self, tree: Tree) -> list[StepPair]:
        return tree.success_pairs(self.explored_only)

    def update(self, model, ref, tokenizer, optimizer, pairs: list[StepPair]) -> dict[str, float]:
        return preference_update(model, ref, tokenizer, optimizer, pairs, self._loss)
