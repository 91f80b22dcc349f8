"""TP-LLaMA (arXiv:2406.07115) and BFS-Prover-V2 (arXiv:2509.06493) recipes: card properties by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lmpo.errors import ConfigError
from lmpo.models.tiny import build_tiny_model, build_tiny_tokenizer
from lmpo.registry import SEARCH_RECIPES
from lmpo.search import SearchConfig, search
from lmpo.search.methods.bfs_prover import BFSProverV2, perplexity_band, step_perplexity
from lmpo.search.methods.tp_llama import TPLLaMA
from lmpo.search.train import completion_logps

from tree_fakes import Scripted, Table

# the TP-LLaMA card's tree: root -> {A (fails), B}; B -> {C (success), D (fails)}
CARD_STEPS = {"r": [("B", -1.0), ("A", -0.5)], "r/A": [("x", 0.0)], "r/B": [("D", -0.2), ("C", -0.9)]}
CARD_OUTCOME = {("A", "x"): (0.0, True), ("B", "C"): (1.0, True), ("B", "D"): (0.0, True)}


def test_tp_llama_card_pairs_from_a_dfs_tree():
    recipe = TPLLaMA(search=SearchConfig(algorithm="dfs", k=2, max_depth=3, budget=20))
    tree = search(Table(CARD_OUTCOME), Scripted(CARD_STEPS), recipe.search)
    # DFS: root expands B (-1), A (-0.5); A first (higher log-prob): x fails; then B: D (-0.2) fails, C succeeds
    assert [n.action for n in tree.nodes] == ["", "B", "A", "x", "D", "C"]
    assert {(p.prompt, p.chosen, p.rejected) for p in recipe.extract(tree)} == {("r", "B", "A"), ("r/B", "C", "D")}


def test_tp_llama_no_success_no_pairs_and_dfs_widens_failed_nodes():
    steps = {"r": [("A", -1.0), ("B", -2.0), ("C", -3.0)]}
    outcome = {("A",): (0.0, True), ("B",): (0.0, True), ("C",): (1.0, True)}
    narrow = search(Table(outcome), Scripted(steps), SearchConfig(algorithm="dfs", k=2, budget=10))
    assert not narrow.solved and TPLLaMA().extract(narrow) == []
    wide = search(Table(outcome), Scripted(steps), SearchConfig(algorithm="dfs", k=2, max_children=4, budget=10))
    # second round samples C (and A again, merged): C succeeds; both failed siblings become rejected steps
    assert wide.solved and {(p.chosen, p.rejected) for p in TPLLaMA().extract(wide)} == {("C", "A"), ("C", "B")}


def test_bfs_prover_card_perplexity_band():
    # card (a): mean token log-probs [-0.01, -0.5, -3.0] -> PPL [1.01, 1.65, 20.09]; band [1.1, 10] keeps the middle
    ppl = [step_perplexity(lp, 1) for lp in (-0.01, -0.5, -3.0)]
    assert ppl == pytest.approx([1.01005, 1.64872, 20.0855], rel=1e-4)
    assert perplexity_band(ppl, lo=1.1, hi=10.0) == [False, True, False]
    # quantiles: 10 steps with PPL 1..10, band 10-90% (nearest rank: 1 and 9) drops only the top one
    assert perplexity_band([float(i) for i in range(1, 11)], (0.1, 0.9)) == [True] * 9 + [False]
    assert perplexity_band([float(i) for i in range(1, 11)], (0.2, 0.8)) == [False] + [True] * 7 + [False] * 2
    assert step_perplexity(-3.0, 2) == pytest.approx(math.exp(1.5))


def test_bfs_prover_collects_proof_steps_only():
    steps = {"r": [("a", -1.0), ("b", -2.0)], "r/a": [("c", -0.5), ("d", -0.1)]}
    recipe = BFSProverV2(search=SearchConfig(algorithm="best_first", k=2, budget=10))
    tree = search(Table({("a", "c"): (1.0, True)}), Scripted(steps), recipe.search)
    got = recipe.extract(tree)
    assert [(p, s) for p, s, _ in got] == [("r", "a"), ("r/a", "c")]
    assert [x for _, _, x in got] == pytest.approx([math.e, math.exp(0.5)])
    assert recipe.filter(got) == [("r", "a"), ("r/a", "c")]  # two steps: both inside the 10-90% band


def test_bfs_prover_sft_update_raises_the_proof_step():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(seed=0, init_std=0.1)
    recipe = SEARCH_RECIPES.build("bfs_prover_v2", ppl_quantiles=(0.0, 1.0))
    data = [("3=", "3", 2.0), ("5=", "5", 3.0)]
    lp0 = completion_logps(model, tok, ["3=", "5="], ["3", "5"])[0].detach().sum()
    # SFT gradient = -d/d theta mean_i log pi(step_i | prefix_i): one SGD step raises the mean log-prob
    out = recipe.update(model, None, tok, torch.optim.SGD(model.parameters(), lr=0.1), data)
    lp1 = completion_logps(model, tok, ["3=", "5="], ["3", "5"])[0].detach().sum()
    assert out["kept"] == 2 and out["loss"] == pytest.approx(-float(lp0) / 2, rel=1e-5) and lp1 > lp0


def test_bad_options():
    with pytest.raises(ConfigError, match="ppl_quantiles"):
        BFSProverV2(ppl_quantiles=(0.9, 0.1))
    with pytest.raises(ConfigError, match="best_first"):
        BFSProverV2(search=SearchConfig(algorithm="mcts"))
    with pytest.raises(ConfigError, match="Unknown preference"):
        TPLLaMA(loss="nope")
