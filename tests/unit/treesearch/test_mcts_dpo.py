"""MCTS-DPO (arXiv:2405.00451): committed path, max-Q vs min-Q step pairs, step-level DPO through PREFERENCE_LOSSES."""

from __future__ import annotations

import math

import pytest
import torch

from lmpo.errors import ConfigError
from lmpo.methods.base import PairLogps
from lmpo.models.tiny import build_tiny_model, build_tiny_tokenizer
from lmpo.registry import SEARCH_RECIPES
from lmpo.search import Node, SearchConfig, StepPair, Tree, search
from lmpo.search.methods.mcts_dpo import MCTSDPO, committed_path, mcts_pairs
from lmpo.search.train import pair_logps, preference_batch

from tree_fakes import Scripted, Table


def toy_tree() -> Tree:
    """root -> x (N=3, Q=0.5), y (N=1, Q=-1), z (N=2, Q=0.25); x -> u (N=1, Q=1), v (N=1, Q=0)."""
    t = Tree([Node("r", ())])
    for a, n, w in (("x", 3, 1.5), ("y", 1, -1.0), ("z", 2, 0.5)):
        t.add(Node("r/" + a, (a,), 0, a, visits=n, value_sum=w, depth=1))
    for a, n, w in (("u", 1, 1.0), ("v", 1, 0.0)):
        t.add(Node("r/x/" + a, ("x", a), 1, a, visits=n, value_sum=w, depth=2))
    return t


def test_committed_path_follows_visits_and_pairs_are_max_vs_min_q():
    t = toy_tree()
    assert [t.nodes[i].action for i in committed_path(t)] == ["", "x", "u"]
    pairs = mcts_pairs(t)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("r", "x", "y"), ("r/x", "u", "v")]
    second = mcts_pairs(t, choose_worst=False)  # the code's other option: best against second best
    assert [(p.chosen, p.rejected) for p in second] == [("x", "z"), ("u", "v")]
    assert len(mcts_pairs(t, min_gap=1.2)) == 1  # only x (0.5) vs y (-1) clears a gap of 1.2


def test_off_path_nodes_only_with_pairs_along_all():
    t = toy_tree()
    for a, n, w in (("p", 1, 1.0), ("q", 1, 0.0)):
        t.add(Node("r/z/" + a, ("z", a), 3, a, visits=n, value_sum=w, depth=2))
    assert ("r/z", "p", "q") not in {(p.prompt, p.chosen, p.rejected) for p in mcts_pairs(t, "path")}
    assert ("r/z", "p", "q") in {(p.prompt, p.chosen, p.rejected) for p in mcts_pairs(t, "all")}


def test_recipe_extracts_from_a_search_by_hand():
    # the hand tree of test_tree_engine: Q(a) = 1/3, Q(b) = 0, Q(c) = 1, Q(d) = 0; committed path r -> a -> c
    steps = {"r": [("a", -1.0), ("b", -2.0)], "r/a": [("c", -0.5), ("d", -0.1)]}
    outcome = {("b",): (0.0, True), ("a", "c"): (1.0, True), ("a", "d"): (0.0, True)}
    recipe = MCTSDPO(search=SearchConfig(budget=4, k_root=2, k=2, value="zero"))
    pairs = recipe.extract(search(Table(outcome), Scripted(steps), recipe.search))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("r", "a", "b"), ("r/a", "c", "d")]


def test_step_dpo_at_reference_is_log2_and_its_gradient():
    """Card test (2): with pi = pi_ref the step DPO loss is log 2 per pair; d loss / d log pi(chosen token) =
    -beta sigmoid(0) = -beta / 2 for each token of the chosen step, +beta / 2 for the rejected step's."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(seed=0)
    recipe = SEARCH_RECIPES.build("mcts_dpo")
    pairs = [StepPair("12=", "3", "45", 1.0, 0.0), StepPair("7=", "7", "1", 0.5, -0.5)]
    batch = preference_batch(tok, pairs)
    policy = pair_logps(model, tok, pairs)
    leaf_c = policy.chosen.detach().requires_grad_(True)
    leaf_r = policy.rejected.detach().requires_grad_(True)

    out = recipe._loss(batch, PairLogps(leaf_c, leaf_r), PairLogps(leaf_c.detach(), leaf_r.detach()))
    assert out.per_pair.detach().tolist() == pytest.approx([math.log(2)] * 2)
    out.per_pair.sum().backward()
    torch.testing.assert_close(leaf_c.grad, torch.tensor([[-0.05], [-0.05]]))
    torch.testing.assert_close(leaf_r.grad, torch.tensor([[0.05, 0.05], [0.05, 0.0]]))


def test_update_moves_the_policy_towards_the_chosen_step():
    tok = build_tiny_tokenizer()
    model, ref = build_tiny_model(seed=0, init_std=0.1), build_tiny_model(seed=0, init_std=0.1)
    recipe = SEARCH_RECIPES.build("mcts_dpo")
    pairs = [StepPair("3=", "3", "8", 1.0, 0.0)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def margin():
        with torch.no_grad():
            lp = pair_logps(model, tok, pairs)
        return float(lp.chosen.sum() - lp.rejected.sum())

    before = margin()
    metrics = recipe.update(model, ref, tok, opt, pairs)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6) and margin() > before


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="pairs_along"):
        MCTSDPO(pairs_along="tree")
    with pytest.raises(ConfigError, match="search.algorithm must be mcts"):
        MCTSDPO(search=SearchConfig(algorithm="dfs"))
    with pytest.raises(ConfigError, match="Unknown preference"):
        MCTSDPO(loss="dpoo")


@pytest.mark.parametrize("name", __import__("lmpo.registry", fromlist=["x"]).PREFERENCE_LOSSES.names())
def test_search_pairs_train_with_every_registered_preference_loss(name):
    """The step pairs fit the preference contract: every PREFERENCE_LOSSES component takes them (finite loss, a step)."""
    from lmpo.registry import PREFERENCE_LOSSES
    from lmpo.search.train import preference_update

    tok = build_tiny_tokenizer()
    model, ref = build_tiny_model(seed=0, init_std=0.1), build_tiny_model(seed=0, init_std=0.1)
    pairs = [StepPair("3 5 2 8=", "3+5=8", "5+2=7", 1.0, 0.0), StepPair("1=", "1", "22", 0.5, 0.0)]
    out = preference_update(model, ref, tok, torch.optim.SGD(model.parameters(), lr=0.1), pairs,
                            PREFERENCE_LOSSES.build(name))
    assert math.isfinite(out["loss"])


def test_iterate_is_deterministic_under_its_seeds():
    import dataclasses

    from lmpo.envs import build_env
    from lmpo.search import EnvDomain, TokenProposer
    from lmpo.search.train import iterate

    def run():
        tok, env = build_tiny_tokenizer(), build_env("copy_turns", turns=2)
        model = build_tiny_model(seed=0, init_std=0.1).eval()
        recipe = MCTSDPO(search=SearchConfig(k_root=4, k=2, max_depth=2, budget=8, value="zero"))
        prop = TokenProposer(model, tok)
        mk = lambda s, it, i: search(EnvDomain(env, seed=s, sep=""), prop,  # noqa: E731
                                     dataclasses.replace(recipe.search, seed=10 * it + i))
        log = iterate(recipe, model, tok, mk, [0, 1, 2], 2, torch.optim.SGD(model.parameters(), lr=0.1))
        return log.examples, [round(m["loss"], 6) for m in log.metrics]

    assert run() == run()


def test_pairs_round_trip_through_the_preference_stage_loader(tmp_path):
    from lmpo.search.train import write_pairs
    from lmpo.tasks.pairs import load_pairs

    pairs = [StepPair("3 5 2 8=", "3+5=8", "5+2=7", 1.0, 0.25, depth=0), StepPair("r/a", "c", "d", 0.5, 0.0)]
    path = tmp_path / "pairs.jsonl"
    assert write_pairs(pairs, str(path)) == 2
    rows = load_pairs(str(path))
    assert [(r["prompt"], r["chosen"], r["rejected"], r["q_gap"]) for r in rows] == [
        ("3 5 2 8=", "3+5=8", "5+2=7", 0.75), ("r/a", "c", "d", 0.5)]
