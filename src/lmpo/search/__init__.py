"""Tree search over step prefixes: domains, proposers, the tree and its training data (docs/search.md)."""

from lmpo.search.domain import (EnvDomain, GeneratorProposer, Proposal, SearchDomain, StepProposer, TokenProposer,
                                Transition)
from lmpo.search.engine import ALGORITHMS, SearchConfig, TreeSearch, sample_paths, search
from lmpo.search.tree import Node, StepPair, Tree

__all__ = ["ALGORITHMS", "EnvDomain", "GeneratorProposer", "Node", "Proposal", "SearchConfig", "SearchDomain",
           "StepPair", "StepProposer", "TokenProposer", "Transition", "Tree", "TreeSearch", "sample_paths", "search"]

from lmpo.search import methods  # noqa: E402,F401  (registers the recipes in SEARCH_RECIPES)
