"""The tree-rollout engine on toy trees whose values are derived by hand, plus determinism and budgets on Countdown."""

from __future__ import annotations

import math

import pytest

from lmpo.envs import build_env
from lmpo.errors import ConfigError
from lmpo.models.tiny import build_tiny_model, build_tiny_tokenizer
from lmpo.rollout.base import SamplingParams
from lmpo.rollout.hf import HFGenerator
from lmpo.search import EnvDomain, GeneratorProposer, Node, SearchConfig, StepPair, Tree, TreeSearch, sample_paths, search

from tree_fakes import Scripted, Table

# root -> a (log-prob -1), b (-2, a dead end: terminal, reward 0); a -> c (success, reward 1), d (terminal, 0)
STEPS = {"r": [("a", -1.0), ("b", -2.0)], "r/a": [("c", -0.5), ("d", -0.1)]}
OUTCOME = {("b",): (0.0, True), ("a", "c"): (1.0, True), ("a", "d"): (0.0, True)}


def test_mcts_values_by_hand():
    """Budget 4, k_root = k = 2, value "zero" (rewards only).
    Iteration 1 expands the root: a and b are backed up with return 0 (root N=2).
    Iteration 2 selects by PUCT: priors softmax(-1, -2) = (0.7311, 0.2689); with Q = 0 and N(root) = 2,
    a scores 0.7311 * sqrt(2) / 2 = 0.517 > b 0.190 -> expand a: c returns 1 (a: 0 + 1), d returns 0.
    So N/W: c 1/1, d 1/0, a 3/1, b 1/0, root 4/1."""
    tree = search(Table(OUTCOME), Scripted(STEPS), SearchConfig(budget=4, k_root=2, k=2, value="zero"))
    by = {n.action: n for n in tree.nodes}
    assert [(by[x].visits, by[x].value_sum) for x in "abcd"] == [(3, 1.0), (1, 0.0), (1, 1.0), (1, 0.0)]
    assert (tree.root.visits, tree.root.value_sum, tree.generated) == (4, 1.0, 4)
    assert by["a"].q == pytest.approx(1 / 3)
    assert tree.solved and tree.solutions() == [["a", "c"]]
    assert tree.step_pairs() == [StepPair("r", "a", "b", 1 / 3, 0.0, 3, 1, 0), StepPair("r/a", "c", "d", 1.0, 0.0, 1, 1, 1)]
    assert tree.step_pairs(min_gap=0.5) == [StepPair("r/a", "c", "d", 1.0, 0.0, 1, 1, 1)]
    assert sorted(tree.step_values()) == [("r", "a", 1 / 3, 3), ("r", "b", 0.0, 1), ("r/a", "c", 1.0, 1),
                                          ("r/a", "d", 0.0, 1)]


def test_card_pair_rule_max_vs_min_q():
    """MCTS-DPO card test (1): children Q = [0.7, -0.2, 0.4] -> chosen child 0, rejected child 1."""
    tree = Tree([Node("r", ())])
    for action, q in zip("xyz", (0.7, -0.2, 0.4)):
        tree.add(Node("r/" + action, (action,), 0, action, visits=1, value_sum=q))
    (pair,) = tree.step_pairs()
    assert (pair.chosen, pair.rejected, pair.q_chosen, pair.q_rejected) == ("x", "y", 0.7, -0.2)


def test_puct_prefers_the_prior_when_unvisited_and_q_ties():
    """MCTS-DPO card test (3): N(s,a) = 0 for every child and equal Q -> the largest prior wins."""
    ts = TreeSearch(Table({}), Scripted({"r": [("a", -3.0), ("b", -1.0), ("c", -2.0)]}), SearchConfig(k_root=3))
    ts.expand(0, 3)
    ts.tree.root.visits = 1
    assert ts.tree.nodes[ts.puct_child(0)].action == "b"
    assert ts.priors(0) == pytest.approx([math.exp(-3) / s for s in [math.exp(-3) + math.exp(-1) + math.exp(-2)]]
                                         + [math.exp(-1) / (math.exp(-3) + math.exp(-1) + math.exp(-2)),
                                            math.exp(-2) / (math.exp(-3) + math.exp(-1) + math.exp(-2))])


def test_rollout_value_and_discount_by_hand():
    """k_root = 1: a is added, one Monte-Carlo rollout from a samples c (reward 1, terminal): V(s_a) = 1. With
    gamma = 0.5: Q(a) = 0 + 0.5 * 1 = 0.5 and the root's return is 0 + 0.5 * 0.5 = 0.25. Two samples used."""
    tree = search(Table(OUTCOME), Scripted({"r": [("a", -1.0)], "r/a": [("c", 0.0)]}),
                  SearchConfig(budget=2, k_root=1, k=1, value="rollout", gamma=0.5))
    a = tree.nodes[1]
    assert (a.action, a.visits, a.q, tree.root.q, tree.generated) == ("a", 1, 0.5, 0.25, 2)
    assert len(tree.nodes) == 2  # rollout steps are not added to the tree
    assert tree.solved and tree.solutions() == [["a", "c"]]  # ... but the success they found counts


def test_value_function_is_called_on_new_nonterminal_nodes():
    seen = []
    tree = search(Table(OUTCOME), Scripted(STEPS),
                  SearchConfig(budget=2, k_root=2, value=lambda prefix: seen.append(prefix) or 0.25))
    assert seen == ["r/a"]  # b is terminal: no value call
    assert [n.q for n in tree.nodes[1:]] == [0.25, 0.0]


def test_best_first_pops_the_highest_log_prob_path():
    """BFS-Prover card test (b): root -> a (-1), b (-2). a is popped first (path log-prob -1 > -2): its children
    c (-1 - 0.5 = -1.5, success) stops the search."""
    steps = {"r": [("a", -1.0), ("b", -2.0)], "r/a": [("c", -0.5), ("d", -0.1)], "r/b": [("e", 0.0)]}
    prop = Scripted(steps)
    tree = search(Table({("a", "c"): (1.0, True)}), prop, SearchConfig(algorithm="best_first", budget=10, k=2))
    assert [p for p, _ in prop.calls] == ["r", "r/a"]
    assert tree.solutions() == [["a", "c"]]
    prop2 = Scripted({**steps, "r/a": [("d", -5.0)], "r/a/d": [("f", 0.0)]})
    search(Table({}), prop2, SearchConfig(algorithm="best_first", budget=5, k=2, max_depth=3))
    # after a (-1) comes b (-2) before a/d (-6)
    assert [p for p, _ in prop2.calls][:3] == ["r", "r/a", "r/b"]


def test_dfs_and_tp_llama_pairs_on_the_card_tree():
    """TP-LLaMA card: root -> {A (fail), B}; B -> {C (success), D (fail)}: exactly (root, B > A) and (B, C > D)."""
    steps = {"r": [("B", -1.0), ("A", -0.5)], "r/A": [("x", 0.0)], "r/B": [("D", -0.2), ("C", -0.9)]}
    outcome = {("A", "x"): (0.0, True), ("B", "C"): (1.0, True), ("B", "D"): (0.0, True)}
    tree = search(Table(outcome), Scripted(steps), SearchConfig(algorithm="dfs", budget=20, k=2, max_depth=3))
    pairs = {(p.prompt, p.chosen, p.rejected) for p in tree.success_pairs()}
    assert pairs == {("r", "B", "A"), ("r/B", "C", "D")}
    assert tree.solutions() == [["B", "C"]]


def test_unexplored_siblings_make_no_pair():
    tree = Tree([Node("r", ())])
    tree.add(Node("r/a", ("a",), 0, "a", reward=1.0, terminal=True))
    tree.add(Node("r/b", ("b",), 0, "b"))  # generated, never tried
    assert tree.success_pairs() == []
    assert [(p.chosen, p.rejected) for p in tree.success_pairs(explored_only=False)] == [("a", "b")]


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="Did you mean"):
        SearchConfig(algorithm="mtcs")
    with pytest.raises(ConfigError, match="search.budget"):
        SearchConfig(budget=0)


@pytest.fixture(scope="module")
def proposer():
    gen = HFGenerator(build_tiny_model(seed=0, init_std=0.1), build_tiny_tokenizer())
    return GeneratorProposer(gen, SamplingParams(temperature=1.0, max_new_tokens=6))


@pytest.mark.parametrize("algorithm", ["mcts", "best_first", "dfs"])
def test_search_on_countdown_is_deterministic_and_in_budget(proposer, algorithm):
    env = build_env("countdown", num_count=3, steps=2, ops="+")
    cfg = SearchConfig(algorithm=algorithm, budget=12, max_depth=2, seed=3)

    def run(seed):
        tree = search(EnvDomain(env, seed=5), proposer, SearchConfig(**{**cfg.__dict__, "seed": seed}))
        return [(n.action, n.visits, n.value_sum) for n in tree.nodes], tree.generated

    a, used = run(3)
    assert a == run(3)[0] and used <= 12 and len(a) <= 13
    assert a != run(4)[0]


def test_sampling_baseline_spends_the_budget(proposer):
    env = build_env("countdown", num_count=3, steps=2, ops="+")
    tree = sample_paths(EnvDomain(env, seed=5), proposer, budget=7, max_depth=2, seed=0)
    assert tree.generated == 7 and len(tree.root.children) >= 4


class _FakeGen:
    """Returns fixed completions with per-token log-probs -0.1, -0.2, ... (character tokens)."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, params):
        import torch

        from lmpo.rollout.base import GenerationOutput

        T = max(len(t) for t in self.texts)
        attn = torch.tensor([[j < len(t) for j in range(T)] for t in self.texts])
        lp = -0.1 * torch.arange(1, T + 1, dtype=torch.float32).expand(len(self.texts), T) * attn
        z = torch.zeros(len(self.texts), 1, dtype=torch.long)
        return GenerationOutput(z, z.bool(), torch.zeros_like(attn, dtype=torch.long), attn, lp,
                                torch.zeros(len(self.texts), dtype=torch.bool), list(self.texts))


def test_generator_proposer_cuts_at_the_stop_string():
    """"3+5=8 7" is cut to "3+5=8" (5 character tokens): log-prob -(0.1 + ... + 0.5) = -1.5; no stop: all tokens."""
    tok = build_tiny_tokenizer()
    prop = GeneratorProposer(_FakeGen(["3+5=8 7", " 12"]), SamplingParams(), stop=" ", tokenizer=tok)
    a, b = prop.propose("x", 2, seed=0)
    assert (a.text, a.num_tokens) == ("3+5=8", 5) and a.logprob == pytest.approx(-1.5)
    assert (b.text, b.num_tokens) == (" 12", 3) and b.logprob == pytest.approx(-0.6)  # a leading stop is kept


@pytest.mark.parametrize("algorithm", ["mcts", "best_first"])
def test_widening_keeps_spending_the_budget_on_dead_ends(algorithm):
    """Every step ends the episode with 0 except "w" (sampled 5th): without widening the search stalls after the
    first round of children; with max_children 6 it keeps sampling at the root and finds "w"."""
    steps = {"r": [("a", -1.0), ("b", -1.0), ("c", -1.0), ("d", -1.0), ("w", -1.0), ("e", -1.0)]}
    outcome = {(x,): (0.0, True) for x in "abcde"} | {("w",): (1.0, True)}
    base = dict(algorithm=algorithm, budget=8, k_root=2, k=2, value="zero", iterations=50)
    stalled = search(Table(outcome), Scripted(steps), SearchConfig(**base))
    assert stalled.generated == 2 and not stalled.solved
    wide = search(Table(outcome), Scripted(steps), SearchConfig(**base, max_children=6))
    assert wide.solved and wide.generated == 6 and len(wide.root.children) == 6
