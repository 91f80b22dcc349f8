"""AdaSearch (arXiv:2512.16883): decision reward 1[d = y(q)] with y from the group's parametric attempts, credited to
the decision turn; outcome advantage on every turn; F1_aware."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.adasearch import (AdaSearchAdvantage, decision_turn, f1_aware, parametric_labels,
                                              search_decisions)
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import from_config, make_batch, tool_episode_batch


def episodes(first_turn_search, rewards, groups=None, later_calls=None):
    """One row per episode: turn 0 searches (1 policy token, 1 call, 1 observation token) then turn 1 answers (1
    token); or turn 0 answers (1 token). ``later_calls`` adds calls on turn 1."""
    later = later_calls or [0] * len(rewards)
    turns = [[(1, 1), (1, 0)] if s else [(1, 0)] for s in first_turn_search]
    calls = [[1, c] if s else [0] for s, c in zip(first_turn_search, later)]
    return tool_episode_batch(turns, rewards=rewards, group_ids=groups, turn_tool_calls=calls)


def test_card_decision_reward_example():
    # decisions [S, N, N], labels [S, N, S] -> decision rewards [1, 1, 0] (offline labels from the task rows)
    b = episodes([1, 0, 0], [1.0, 1.0, 0.0])
    b = b.replace(meta=[{"row": {"needs_search": v}} for v in (1, 0, 1)])
    r_dec, known = AdaSearchAdvantage().decision_rewards(b)
    assert r_dec.tolist() == [1.0, 1.0, 0.0] and known.all()
    assert search_decisions(b).tolist() == [True, False, False]


def test_online_labels_by_hand():
    # group 0 (solvable): parametric attempts rows 1, 2 both right -> rate 1 >= 0.5 -> y = 0; d = [S, N, N, S]
    #   -> R_dec = [0, 1, 1, 0]
    # group 1 (needs search): parametric rows 4, 5, 6, one right -> 1/3 < 0.5 -> y = 1; d = [N, N, N, S] -> [0,0,0,1]
    # group 2: both searched -> no parametric attempt: unknown ("skip": no credit; "search": y = 1 -> [1, 1])
    d = [1, 0, 0, 1, 0, 0, 0, 1, 1, 1]
    r = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    b = episodes(d, r, groups=[0] * 4 + [1] * 4 + [2] * 2)
    r_dec, known = AdaSearchAdvantage().decision_rewards(b)
    assert r_dec.tolist() == [0, 1, 1, 0, 0, 0, 0, 1, 0, 0] and known.tolist() == [True] * 8 + [False] * 2
    r_dec, known = AdaSearchAdvantage(unknown="search").decision_rewards(b)
    assert r_dec[8:].tolist() == [1, 1] and known.all()
    assert AdaSearchAdvantage(tau=1 / 3).decision_rewards(b)[0][4:8].tolist() == [1, 1, 1, 0]  # group 1 solvable
    assert parametric_labels(torch.tensor(d).bool(), torch.tensor(r) >= 1, b.group_ids, 0.5).tolist() == \
        [0.0] * 4 + [1.0] * 4 + [-1.0] * 2


def test_advantage_by_hand():
    # group 0 above: outcome R = (1, 1, 1, 0): mean 0.75, sample std 0.5 -> A_out = (.25, .25, .25, -.75) / (0.5 + 1e-6)
    # R_dec = (0, 1, 1, 0): mean 0.5, std sqrt(1/3) -> A_dec = (-0.5, 0.5, 0.5, -0.5) / (0.57735 + 1e-6)
    # joint, w = 1: decision turn (turn 0) gets A_out + A_dec, the answer turn (turn 1 of searchers) A_out only
    b = episodes([1, 0, 0, 1], [1.0, 1.0, 1.0, 0.0])
    a_out = torch.tensor([0.25, 0.25, 0.25, -0.75]) / (0.5 + 1e-6)
    a_dec = torch.tensor([-0.5, 0.5, 0.5, -0.5]) / (math.sqrt(1 / 3) + 1e-6)
    adv = AdaSearchAdvantage()(b)
    # layout: searchers [policy t0, obs t0, policy t1], answerers [policy t0]
    assert_close(adv[:, 0], a_out + a_dec)
    assert_close(adv[[0, 3], 2], a_out[[0, 3]])
    assert torch.all(adv[~b.response_mask] == 0)
    decide = AdaSearchAdvantage(stage="decide")(b)
    assert_close(decide[:, 0], a_dec)
    assert torch.all(decide[[0, 3], 2] == 0)  # stage 2 alone trains the decision turn only
    half = AdaSearchAdvantage(decision_weight=0.5)(b)
    assert_close(half[:, 0], a_out + 0.5 * a_dec)
    assert decision_turn(b)[0].tolist() == [True, False, False]


def test_stage_one_is_grpo_until_solve_steps():
    b = episodes([1, 0, 0, 1], [1.0, 1.0, 1.0, 0.0])
    fn = AdaSearchAdvantage(solve_steps=2)
    grpo = GRPOAdvantage()(b)
    assert_close(fn(b), grpo)
    fn.observe(b)
    assert_close(fn(b), grpo)
    fn.observe(b)
    assert not torch.allclose(fn(b), grpo)  # stage 2 from the third step
    state = fn.state_dict()
    fresh = AdaSearchAdvantage(solve_steps=2)
    fresh.load_state_dict(state)
    assert_close(fresh(b), fn(b))  # the stage survives a checkpoint


def test_card_property_f1_aware_and_no_call_counting():
    needs = torch.tensor([1, 0, 0, 1, 0])
    assert f1_aware(torch.ones(5, dtype=torch.bool), needs) == 0.0  # always search: no positive prediction
    # decisions N, N, S, S, N against labels S, N, N, S, N: tp = 2 (rows 1, 4), predicted 3, true 3 -> F1 = 2/3
    assert f1_aware(torch.tensor([0, 0, 1, 1, 0]).bool(), needs) == pytest.approx(2 / 3)
    assert f1_aware(needs.bool(), needs) == 1.0
    # the credit never counts calls: more calls after the decision change nothing
    d, r = [1, 0, 1, 0], [1.0, 1.0, 0.0, 0.0]
    assert_close(AdaSearchAdvantage()(episodes(d, r)), AdaSearchAdvantage()(episodes(d, r, later_calls=[5, 0, 3, 0])))


def loop_adv(d, r, groups, tau, w, stage, unknown):
    B = len(d)

    def z(vals, rows):
        out = {}
        for i in rows:
            same = [j for j in rows if groups[j] == groups[i]]
            mu = sum(vals[j] for j in same) / len(same)
            sd = math.sqrt(sum((vals[j] - mu) ** 2 for j in same) / (len(same) - 1)) if len(same) > 1 else 0.0
            out[i] = (vals[i] - mu) / (sd + 1e-6)
        return out

    a_out = z(r, range(B))
    y = {}
    for i in range(B):
        att = [j for j in range(B) if groups[j] == groups[i] and not d[j]]
        if att:
            y[i] = 0 if sum(r[j] >= 1.0 for j in att) / len(att) >= tau else 1
        elif unknown == "search":
            y[i] = 1
    r_dec = {i: float(d[i] == y[i]) for i in y}
    a_dec = z(r_dec, list(y))
    first, later = [], []
    for i in range(B):
        ad = a_dec.get(i, 0.0)
        first.append(ad if stage == "decide" else a_out[i] + w * ad)
        later.append(0.0 if stage == "decide" else a_out[i])
    return first, later


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B = 12
    groups = torch.tensor([5, 5, 5, 5, 1, 1, 1, 1, 8, 8, 8, 8])[torch.randperm(B, generator=g)]
    d = (torch.rand(B, generator=g) > 0.5).long().tolist()
    r = torch.randint(0, 2, (B,), generator=g).float().tolist()
    b = episodes(d, r, groups=groups.tolist())
    for stage in ("decide", "joint"):
        for unknown in ("skip", "search"):
            adv = AdaSearchAdvantage(stage=stage, unknown=unknown, tau=0.4, decision_weight=0.7)(b)
            first, later = loop_adv(d, r, groups.tolist(), 0.4, 0.7, stage, unknown)
            assert_close(adv[:, 0], torch.tensor(first, dtype=torch.float32), atol=1e-5, rtol=1e-5)
            searched = torch.tensor(d).bool()
            assert_close(adv[searched, 2], torch.tensor(later, dtype=torch.float32)[searched], atol=1e-5, rtol=1e-5)


def test_gradient_at_the_old_policy_is_minus_the_advantage():
    b = episodes([1, 0, 0, 1], [1.0, 1.0, 1.0, 0.0])
    adv = AdaSearchAdvantage()(b)
    T = adv.shape[1]
    b = b.replace(advantages=adv, old_logprobs=torch.full((4, T), -1.0))
    lp = torch.full((4, T), -1.0, requires_grad=True)
    PPOClipLoss()(lp, b).per_token.sum().backward()
    assert_close(lp.grad, -adv)


def test_grpo_without_tool_data_and_config_errors():
    plain = make_batch([1.0, 0.0], T=2)
    assert search_decisions(plain) is None
    assert_close(AdaSearchAdvantage()(plain), GRPOAdvantage()(plain))
    b = plain.replace(extras={"tool_calls": torch.tensor([2.0, 0.0])})  # without per-turn counts: total calls
    assert search_decisions(b).tolist() == [True, False]
    for kw, key in (({"stage": "solve"}, "advantage.stage"), ({"tau": 0.0}, "tau"),
                    ({"decision_weight": -1.0}, "decision_weight"), ({"unknown": "x"}, "unknown"),
                    ({"solve_steps": -1}, "solve_steps")):
        with pytest.raises(ConfigError, match=key):
            from_config(AdaSearchAdvantage, **kw)
