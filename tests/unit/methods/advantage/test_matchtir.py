"""MatchTIR (arXiv:2601.10712): bipartite-matched tool-call turn rewards and A = (A^traj + A^turn) / 2."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.advantage.matchtir import (
    MatchTIRAdvantage,
    call_similarity,
    match_calls,
    matched_turn_rewards,
    similarity_matrix,
    sinkhorn,
)
from factories import episode_batch, from_config, make_batch


def call(name, **arguments):
    return {"name": name, "arguments": arguments}


def test_similarity_hand_cases():
    gold = call("search", q="x", k=5)
    assert call_similarity(call("search", q="x", k=5), gold) == 1.0  # (1 + 1 + 2) / (2 + 2)
    assert call_similarity(call("search", q="x", k=3), gold) == 0.75  # (1 + 1 + 1) / 4
    assert call_similarity(call("search", q="x"), gold) == 0.625  # Jaccard {q}/{q, k} = 1/2: (1 + .5 + 1) / 4
    assert call_similarity(call("lookup", q="x", k=5), gold) == 0.0  # another tool
    assert call_similarity(call("now"), call("now")) == 1.0  # no parameters: J = 1, (1 + 1 + 0) / 2
    with pytest.raises(ValueError, match="name"):
        call_similarity({"arguments": {}}, gold)


def test_card_exact_calls_and_duplicates():
    pytest.importorskip("scipy")
    gold = [call("search", q="capital"), call("calc", expr="2+2")]
    # (a) calls equal to the gold calls earn 1.0 each, hard or soft (in any order)
    assert match_calls(list(reversed(gold)), gold, "hard") == [1.0, 1.0]
    assert match_calls(gold[:1], gold[:1], "soft") == pytest.approx([1.0], abs=1e-9)
    # soft: each call carries mass 1/P, so two exact calls earn 1/2 each
    assert match_calls(list(reversed(gold)), gold, "soft") == pytest.approx([0.5, 0.5], abs=1e-3)
    # (b) a duplicated correct call: hard gives 1.0 and the unmatched penalty, OT about half weight each
    dup = [call("search", q="capital"), call("search", q="capital")]
    assert match_calls(dup, gold[:1], "hard", penalty=-0.5) == [1.0, -0.5]
    assert match_calls(dup, gold[:1], "soft") == pytest.approx([0.5, 0.5], abs=1e-6)
    assert match_calls(dup, [], "hard", penalty=-0.5) == [-0.5, -0.5] and match_calls([], gold) == []
    # a call matched only at similarity 0 (another tool) counts as unmatched
    assert match_calls([call("weather", city="x")], gold, "hard", penalty=-0.1) == [-0.1]


def test_hard_matching_is_the_optimal_assignment_not_greedy():
    pytest.importorskip("scipy")
    # p0 = f(a=0, b=0), p1 = f(a=1, b=1, c=1); g0 = f(c=0), g1 = f(a=1, b=0, c=0):
    # s(p0, g0) = (1 + 0 + 0) / 3 = 1/3; s(p0, g1) = (1 + 2/3 + 1 [b]) / 5 = 8/15;
    # s(p1, g0) = (1 + 1/3 + 0) / 3 = 4/9; s(p1, g1) = (1 + 1 + 1 [a]) / 5 = 3/5.
    # Greedy (highest first, the released code) takes 3/5 then 1/3 = 0.933; Kuhn-Munkres 8/15 + 4/9 = 0.978.
    pred, gold = [call("f", a=0, b=0), call("f", a=1, b=1, c=1)], [call("f", c=0), call("f", a=1, b=0, c=0)]
    assert similarity_matrix(pred, gold) == [[pytest.approx(1 / 3), pytest.approx(8 / 15)],
                                             [pytest.approx(4 / 9), pytest.approx(3 / 5)]]
    assert match_calls(pred, gold, "hard") == [pytest.approx(8 / 15), pytest.approx(4 / 9)]
    # and the optimum on random call sets, against brute force over every one-to-one assignment
    rng = random.Random(0)
    for _ in range(40):
        def rand_call():
            return call(rng.choice("fg"), **{k: rng.randint(0, 2) for k in rng.sample("abc", rng.randint(0, 3))})
        pred = [rand_call() for _ in range(rng.randint(1, 4))]
        gold = [rand_call() for _ in range(rng.randint(1, 4))]
        S = similarity_matrix(pred, gold)
        k = min(len(pred), len(gold))
        best = max(sum(S[i][j] for i, j in zip(rows, cols)) for rows in itertools.permutations(range(len(pred)), k)
                   for cols in itertools.permutations(range(len(gold)), k))
        assert sum(match_calls(pred, gold, "hard")) == pytest.approx(best, abs=1e-9)


def test_sinkhorn_plan_has_the_uniform_marginals():
    S = torch.tensor([[1.0, 0.2, 0.0], [0.5, 0.9, 0.1]], dtype=torch.float64)
    T = sinkhorn(S, reg=0.1)
    assert_close(T.sum(1), torch.full((2,), 0.5, dtype=torch.float64), atol=1e-8, rtol=0)
    assert_close(T.sum(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-8, rtol=0)


def test_turn_rewards_are_the_mean_of_each_turns_calls():
    pytest.importorskip("scipy")
    gold = [call("search", q="x", k=5), call("calc", expr="1+1")]
    turns = [[call("search", q="x", k=3), call("calc", expr="1+1")], [], [call("calc", expr="1+1")]]
    # jointly matched: search -> 0.75, the first calc -> 1.0 (the second calc is unmatched: penalty 0)
    assert matched_turn_rewards(turns, gold, "hard") == [pytest.approx(0.875), 0.0, 0.0]
    with pytest.raises(ConfigError, match="hard"):
        match_calls(turns[0], gold, mode="greedy")


def test_hand_case_dual_level_advantage():
    # one group: tau_1 turn rewards [1, 0] (R 1), tau_2 [0, 0] (R 0), tau_3 [0.5] (R 0.5); lambda = 0.9
    # A^traj: R = [1, 0, 0.5], mean 0.5, std (Bessel) 0.5 -> [1, -1, 0]
    # turn 0 returns G = [1 + 0.9 * 0, 0, 0.5] = [1, 0, 0.5] -> z = [1, -1, 0]; turn 1: [0, 0] (tau_1, tau_2) -> 0
    # A = (A^traj + A^turn) / 2: tau_1 [1, 0.5], tau_2 [-1, -0.5], tau_3 [0]
    b = episode_batch([[1.0, 0.0], [0.0, 0.0], [0.5]], tokens=[[2, 1], [1, 1], [3]], pad=1)
    adv = MatchTIRAdvantage(discount=0.9, eps=0.0)(b)
    m = b.response_mask
    want = torch.tensor([[1.0, 1.0, 0.0, 0.5, 0.0], [-1.0, 0.0, -0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert_close(adv, want * m, atol=1e-6, rtol=0)
    # a wrong turn inside the successful trajectory is still penalised: tau_1 [0, 1] vs tau_2 [1, 0], equal returns
    b2 = episode_batch([[0.0, 1.0], [1.0, 0.0]])
    _, a_turn = MatchTIRAdvantage(discount=0.9, eps=0.0).components(b2)
    # turn 0 returns [0.9, 1] -> z = [-0.7071, 0.7071]; turn 1 returns [1, 0] -> [0.7071, -0.7071]
    assert_close(a_turn, torch.tensor([[-1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2), atol=1e-6,
                 rtol=0)


def test_card_property_one_turn_per_trajectory_is_grpo():
    g = torch.Generator().manual_seed(2)
    b = make_batch(torch.rand(6, generator=g), [0, 0, 0, 1, 1, 1], [3, 2, 4, 1, 4, 2])
    assert_close(MatchTIRAdvantage()(b), GRPOAdvantage()(b))
    e = episode_batch([[0.3], [0.9], [0.1], [0.5]], [0, 0, 1, 1], tokens=[[2], [1], [3], [2]])
    assert_close(MatchTIRAdvantage()(e), GRPOAdvantage()(e))


def loop_matchtir(turn_rewards, groups, R, lam, w, eps):
    def z(xs, x):
        m = sum(xs) / len(xs)
        s = math.sqrt(sum((v - m) ** 2 for v in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        return (x - m) / (s + eps)

    B = len(turn_rewards)
    G = [[sum(lam ** (m - k) * r[m] for m in range(k, len(r))) for k in range(len(r))] for r in turn_rewards]
    out = []
    for i in range(B):
        same = [j for j in range(B) if groups[j] == groups[i]]
        a_traj = z([R[j] for j in same], R[i])
        row = []
        for k in range(len(turn_rewards[i])):
            pool = [G[j][k] for j in same if k < len(G[j])]
            row.append(w * a_traj + (1 - w) * z(pool, G[i][k]))
        out.append(row)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference(seed):
    rng = random.Random(seed)
    B = 8
    groups = [rng.choice([1, 5]) for _ in range(B)]
    turn_rewards = [[rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(rng.randint(1, 4))] for _ in range(B)]
    tokens = [[rng.randint(1, 3) for _ in r] for r in turn_rewards]
    R = [sum(r) + rng.choice([0.0, 0.5]) for r in turn_rewards]
    b = episode_batch(turn_rewards, groups, tokens=tokens, rewards=R, pad=1, max_turns=5)
    w = rng.choice([0.5, 0.3])
    fn = MatchTIRAdvantage(discount=0.9, traj_weight=w)
    adv = fn(b)
    ref = loop_matchtir(turn_rewards, groups, R, 0.9, w, 1e-6)
    for i in range(B):
        for k, want in enumerate(ref[i]):
            vals = adv[i][b.response_mask[i] & (b.turn_ids[i] == k)]
            assert vals.numel() == tokens[i][k] and (vals - want).abs().max() < 1e-5
    assert (adv[~b.response_mask] == 0).all()


def test_config_errors():
    for kw, key in (({"discount": 1.5}, "advantage.discount"), ({"traj_weight": -0.1}, "traj_weight")):
        with pytest.raises(ConfigError, match=key):
            from_config(MatchTIRAdvantage, **kw)


def test_hard_matching_without_scipy_names_the_fix(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import fails as if scipy were not installed
    with pytest.raises(ConfigError, match="scipy"):
        match_calls([call("f")], [call("f")], "hard")
    assert match_calls([call("f")], [call("f")], "soft") == pytest.approx([1.0])  # soft needs torch only
