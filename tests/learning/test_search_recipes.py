"""Learning tests of the search recipes (lmpo.search.methods): the tiny model, searching the two-turn copy
environment (one digit a turn, reward 1/2 per right digit) with one-token steps, improves its greedy return on
held-out episodes; the same recipe fed its own data with the preference (or the success) inverted must not.

Thresholds come from runs on two model seeds with margin (see each test); a run takes a few seconds with one thread.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmpo.envs import build_env
from lmpo.models.tiny import build_tiny_model, build_tiny_tokenizer
from lmpo.registry import SEARCH_RECIPES
from lmpo.search import EnvDomain, StepPair, TokenProposer, sample_paths, search
from lmpo.search.train import iterate

HELD_OUT = range(100, 164)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def greedy_return(model, tok, env) -> float:
    g = TokenProposer(model, tok, temperature=0)
    return sum(sample_paths(EnvDomain(env, seed=s, sep=""), g, budget=2, max_depth=2).root.q for s in HELD_OUT) / len(
        HELD_OUT)


@torch.no_grad()
def copy_prob(model, tok) -> float:
    """Mean probability of the right reply to each first observation "d=" (a smooth measure of the skill)."""
    ps = []
    for d in "0123456789":
        logits = model(torch.tensor([tok(d + "=", add_special_tokens=False)["input_ids"]])).logits[0, -1]
        ps.append(float(torch.softmax(logits, -1)[tok.convert_tokens_to_ids(d)]))
    return sum(ps) / len(ps)


def train(recipe, seed: int, iterations: int = 8, prompts: int = 16, lr: float = 1e-2, updates: int = 2):
    """(greedy return before, after, the iteration log, copy probability before, after)."""
    tok, env = build_tiny_tokenizer(), build_env("copy_turns", turns=2)
    model = build_tiny_model(seed=seed, init_std=0.1).eval()
    proposer, before, p0 = TokenProposer(model, tok), greedy_return(model, tok, env), copy_prob(model, tok)

    def make_tree(s, it, i):
        cfg = dataclasses.replace(recipe.search, seed=1000 * it + i)
        return search(EnvDomain(env, seed=s + 1000 * it, sep=""), proposer, cfg)

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    log = iterate(recipe, model, tok, make_tree, list(range(prompts)), iterations, opt, updates=updates)
    return before, greedy_return(model, tok, env), log, p0, copy_prob(model, tok)


class Inverted:
    """A recipe whose pairs are swapped (the control)."""

    def __init__(self, recipe):
        self.recipe, self.search = recipe, recipe.search
        self.ref_per_iteration = getattr(recipe, "ref_per_iteration", False)

    def extract(self, tree):
        return [StepPair(p.prompt, p.rejected, p.chosen, p.q_rejected, p.q_chosen) for p in self.recipe.extract(tree)]

    def update(self, *a):
        return self.recipe.update(*a)


def mcts_dpo():
    # paper defaults (beta 0.1, k_root 4, k 2) at a tiny budget; value "zero": the environment's rewards only
    recipe = SEARCH_RECIPES.build("mcts_dpo")
    return dataclasses.replace(recipe, search=dataclasses.replace(recipe.search, max_depth=2, budget=24, value="zero"))


@pytest.mark.parametrize("seed", [0, 1])
def test_mcts_dpo_learns_copy_turns(seed):
    # measured: seed 0: 0.008 -> 0.227, seed 1: 0.172 -> 0.383; inverted pairs: -> 0.0 and 0.016
    before, after, log, _, _ = train(mcts_dpo(), seed)
    assert after >= before + 0.15, (before, after, log.examples)
    assert sum(log.examples) > 50


def test_mcts_dpo_inverted_pairs_do_not_learn():
    before, after, *_ = train(Inverted(mcts_dpo()), 1)
    assert after <= before, (before, after)


def tp_llama():
    # paper pairs and DPO (beta 0.1), DFS with up to 10 children a node (the DFSDT shape) at a tiny budget
    recipe = SEARCH_RECIPES.build("tp_llama")
    return dataclasses.replace(recipe, search=dataclasses.replace(recipe.search, max_depth=2, budget=40,
                                                                  max_children=10))


@pytest.mark.parametrize("seed", [0, 1])
def test_tp_llama_learns_copy_turns(seed):
    # measured copy probability: seed 0: 0.046 -> 0.158, seed 1: 0.056 -> 0.112; inverted: -> 0.026, 0.020
    *_, p0, p1 = train(tp_llama(), seed)
    assert p1 >= 1.5 * p0, (p0, p1)


def test_tp_llama_inverted_pairs_do_not_learn():
    *_, p0, p1 = train(Inverted(tp_llama()), 0)
    assert p1 < p0, (p0, p1)


class FailedPaths:
    """BFS-Prover-V2 fed the steps of failed paths instead of proofs (the control)."""

    def __init__(self, recipe):
        self.recipe, self.search, self.ref_per_iteration = recipe, recipe.search, False

    def extract(self, tree):
        out = []
        for i, n in enumerate(tree.nodes):
            if n.terminal and not tree.is_success(i):
                out += [(tree.nodes[tree.nodes[j].parent].prefix, tree.nodes[j].action, 1.0) for j in tree.path(i)[1:]]
        return out

    def update(self, *a):
        return self.recipe.update(*a)


def bfs_prover():
    # best-first (k 4, length alpha 0.5), the 10-90% perplexity band, one SFT step per update
    recipe = SEARCH_RECIPES.build("bfs_prover_v2")
    return dataclasses.replace(recipe, search=dataclasses.replace(recipe.search, max_depth=2, budget=24))


@pytest.mark.parametrize("seed", [0, 1])
def test_bfs_prover_v2_learns_copy_turns(seed):
    *_, p0, p1 = train(bfs_prover(), seed)
    assert p1 >= 1.5 * p0, (p0, p1)


def test_bfs_prover_v2_on_failed_paths_does_not_learn():
    *_, p0, p1 = train(FailedPaths(bfs_prover()), 0)
    assert p1 < 1.2 * p0, (p0, p1)
