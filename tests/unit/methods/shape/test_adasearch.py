"""AdaSearch (arXiv:2512.16883): decision reward 1[d = y(q)], y from the group's parametric attempts; F1_aware."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.shape.adasearch import AdaSearchShaper, f1_aware, parametric_labels, search_decisions
from factories import episode_batch, from_config, make_batch


def episodes(first_turn_search, rewards, groups=None, later_calls=None):
    """One row per episode: turn 0 searches (1 call) or answers; ``later_calls`` adds calls on turn 1."""
    later = later_calls or [0] * len(rewards)
    turns = [[(2, 1), (1, 0)] if s else [(2, 0)] for s in first_turn_search]
    calls = [[1, c] if s else [0] for s, c in zip(first_turn_search, later)]
    return episode_batch(turns, rewards=rewards, group_ids=groups, turn_tool_calls=calls)


def test_card_decision_reward_example():
    # decisions [S, N, N], labels [S, N, S] -> rewards [1, 1, 0] (offline labels from the task rows)
    b = episodes([1, 0, 0], [1.0, 1.0, 0.0])
    b = b.replace(meta=[{"row": {"needs_search": v}} for v in (1, 0, 1)])
    out = AdaSearchShaper(stage="decide")(b)
    assert out.rewards.tolist() == [1.0, 1.0, 0.0]
    assert out.extras["search_decision"].tolist() == [1.0, 0.0, 0.0]
    assert out.extras["search_label"].tolist() == [1.0, 0.0, 1.0]


def test_online_labels_by_hand():
    # group 0 (question solvable): 2 parametric attempts, both right -> rate 1 >= 0.5 -> y = 0 (no search needed)
    #   rows: S right, N right, N right, S wrong -> decide: [0, 1, 1, 0]; joint: R + 1[d = y] = [1, 2, 2, 0]
    # group 1 (needs search): parametric attempts 1 right of 3 -> rate 1/3 < 0.5 -> y = 1
    #   rows: N wrong, N right, N wrong, S right -> decide: [0, 0, 0, 1]; joint: [0, 1, 0, 2]
    # group 2: everyone searched -> no parametric attempt: skip (R_dec = 0) or label "search" (R_dec = 1)
    d = [1, 0, 0, 1, 0, 0, 0, 1, 1, 1]
    r = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    b = episodes(d, r, groups=[0] * 4 + [1] * 4 + [2] * 2)
    assert AdaSearchShaper(stage="decide")(b).rewards.tolist() == [0, 1, 1, 0, 0, 0, 0, 1, 0, 0]
    assert AdaSearchShaper()(b).rewards.tolist() == [1, 2, 2, 0, 0, 1, 0, 2, 1, 0]
    assert AdaSearchShaper(stage="decide", unknown="search")(b).rewards[8:].tolist() == [1, 1]
    assert AdaSearchShaper(decision_weight=0.5)(b).rewards[:4].tolist() == [1, 1.5, 1.5, 0]
    # tau = 1/3 makes group 1 solvable: y = 0, so its parametric attempts are the right decision
    assert AdaSearchShaper(stage="decide", tau=1 / 3)(b).rewards[4:8].tolist() == [1, 1, 1, 0]


def test_card_property_f1_aware_and_no_call_counting():
    needs = torch.tensor([1, 0, 0, 1, 0])
    assert f1_aware(torch.ones(5, dtype=torch.bool), needs) == 0.0  # always search: no positive prediction
    # decisions N, N, S, S, N against labels S, N, N, S, N: tp = 2 (rows 1, 4), predicted 3, true 3 -> F1 = 2/3
    assert f1_aware(torch.tensor([0, 0, 1, 1, 0]).bool(), needs) == pytest.approx(2 / 3)
    assert f1_aware(needs.bool(), needs) == 1.0
    # the reward never counts calls: more calls after the decision change nothing
    d, r = [1, 0, 1, 0], [1.0, 1.0, 0.0, 0.0]
    a = AdaSearchShaper()(episodes(d, r))
    b = AdaSearchShaper()(episodes(d, r, later_calls=[5, 0, 3, 0]))
    assert_close(a.rewards, b.rewards)


def loop_rewards(d, r, groups, tau, w, stage, unknown):
    out = []
    for i in range(len(d)):
        att = [j for j in range(len(d)) if groups[j] == groups[i] and not d[j]]
        if att:
            y = 0 if sum(r[j] >= 1.0 for j in att) / len(att) >= tau else 1
        else:
            y = 1 if unknown == "search" else None
        dec = float(y is not None and d[i] == y)
        out.append(dec if stage == "decide" else r[i] + w * dec)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B = 12
    groups = torch.tensor([5, 5, 5, 5, 1, 1, 1, 1, 8, 8, 8, 8])[torch.randperm(B, generator=g)]
    d = (torch.rand(B, generator=g) > 0.5).long().tolist()
    r = torch.randint(0, 2, (B,), generator=g).float().tolist()
    for stage in ("decide", "joint"):
        for unknown in ("skip", "search"):
            sh = AdaSearchShaper(stage=stage, unknown=unknown, tau=0.4, decision_weight=0.7)
            got = sh(episodes(d, r, groups=groups.tolist())).rewards
            assert_close(got, torch.tensor(loop_rewards(d, r, groups.tolist(), 0.4, 0.7, stage, unknown)))


def test_gradient_flows_through_the_decision_reward():
    # GRPO on the decision reward of one group: labels from 2 right parametric attempts -> y = 0.
    # decide-stage rewards [0, 1, 1, 0] -> A = (R - 0.5) / std, std = sqrt(4 * 0.25 / 3) = 0.57735 -> (-+0.866)
    b = AdaSearchShaper(stage="decide")(episodes([1, 0, 0, 1], [1.0, 1.0, 1.0, 0.0]))
    adv = GRPOAdvantage()(b)
    s = (1 / 3) ** 0.5
    assert_close(adv[:, 0], torch.tensor([-0.5, 0.5, 0.5, -0.5]) / (s + 1e-6))
    # REINFORCE gradient of -sum A log pi over trained tokens is -A per token (analytic)
    lp = torch.zeros(b.response_mask.shape, requires_grad=True)
    (-(adv * lp)[b.response_mask].sum()).backward()
    assert_close(lp.grad, -adv)


def test_passthrough_labels_and_config_errors():
    plain = make_batch([1.0, 0.0], T=2)
    assert search_decisions(plain) is None and AdaSearchShaper()(plain) is plain
    # without per-turn counts the episode's total calls decide
    b = plain.replace(extras={"tool_calls": torch.tensor([2.0, 0.0])})
    assert search_decisions(b).tolist() == [True, False]
    y = parametric_labels(torch.tensor([True, False, True]), torch.tensor([True, True, False]),
                          torch.tensor([0, 0, 1]), 0.5)
    assert y.tolist() == [0.0, 0.0, -1.0]
    for kw, key in (({"stage": "solve"}, "shapers\\[0\\].stage"), ({"tau": 0.0}, "tau"),
                    ({"decision_weight": -1.0}, "decision_weight"), ({"unknown": "x"}, "unknown")):
        with pytest.raises(ConfigError, match=key):
            from_config(AdaSearchShaper, **kw)
