"""IGPO (arXiv:2510.14967): information-gain turn rewards C_{t+1} - C_t, the outcome on the last turn, jointly
z-scored per group (population std), accumulated backwards with gamma."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError, DataError
from lmpo.methods.advantage.igpo import IGPOAdvantage, igpo_turn_rewards
from factories import episode_batch, from_config, make_batch


def with_conf(b, conf):
    M = b.extras["turn_rewards"].shape[1]
    c = torch.tensor([list(r) + [0.0] * (M - len(r)) for r in conf])
    return b.replace(extras={**b.extras, "turn_answer_confidence": c})


def per_turn(adv, b):
    return [[float(adv[i][b.response_mask[i] & (b.turn_ids[i] == t)][0]) for t in range(int(b.extras["num_turns"][i]))]
            for i in range(b.batch_size)]


def test_turn_rewards_are_confidence_gains_then_the_outcome():
    C = torch.tensor([[0.1, 0.4, 0.3], [0.2, 0.0, 0.0]])
    r = igpo_turn_rewards(C, torch.tensor([3, 1]), torch.tensor([1.0, 0.5]))
    assert_close(r, torch.tensor([[0.3, -0.1, 1.0], [0.5, 0.0, 0.0]], dtype=torch.float64), atol=1e-7, rtol=0)


def test_hand_case_joint_normalisation_and_accumulation():
    # episode 0: C = [0.1, 0.4], outcome 1 -> r = [0.3, 1]; episode 1: one turn, outcome 0 -> r = [0].
    # pooled {0.3, 1, 0}: mean 13/30, population std sqrt(((0.3 - m)^2 + (1 - m)^2 + m^2) / 3);
    # gamma = 1: A_0 = [z(0.3) + z(1), z(1)], A_1 = [z(0)]; gamma = 0.5: A_0[0] = z(0.3) + 0.5 z(1)
    b = with_conf(episode_batch([[0.0, 1.0], [0.0]], tokens=[[2, 1], [1]]), [[0.1, 0.4], [0.1]])
    m = 1.3 / 3
    s = math.sqrt(((0.3 - m) ** 2 + (1 - m) ** 2 + m ** 2) / 3)
    z = lambda x: (x - m) / s  # noqa: E731
    got = per_turn(IGPOAdvantage(gamma=1.0, eps=0.0)(b), b)
    assert got[0] == pytest.approx([z(0.3) + z(1.0), z(1.0)], abs=1e-5) and got[1] == pytest.approx([z(0.0)], abs=1e-5)
    got = per_turn(IGPOAdvantage(gamma=0.5, eps=0.0)(b), b)
    assert got[0][0] == pytest.approx(z(0.3) + 0.5 * z(1.0), abs=1e-5)
    adv = IGPOAdvantage()(b)
    assert (adv[~b.response_mask] == 0).all()


def test_card_property_ties_still_give_a_signal_and_one_turn_is_grpo_population_std():
    # every outcome ties (GRPO: all zero advantages) but the first episode's turn raised the answer's probability
    b = with_conf(episode_batch([[0.0, 1.0], [0.0, 1.0]], [0, 0]), [[0.2, 0.6], [0.2, 0.2]])
    a = per_turn(IGPOAdvantage()(b), b)
    assert a[0][0] > a[1][0]
    # one turn per episode: (R - mean) / population std
    s = make_batch([1.0, 0.0, 0.0, 2.0], [0, 0, 0, 1], [2, 1, 3, 2])
    adv = IGPOAdvantage(eps=0.0)(s)
    sd = math.sqrt((4 / 9 + 1 / 9 + 1 / 9) / 3)
    assert_close(adv[:3, 0], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / sd, atol=1e-5, rtol=0)
    assert adv[3].abs().sum() == 0  # a group of one (std := 1, deviation 0)


def loop_igpo(conf, outcome, groups, gamma, eps):
    B = len(conf)
    r = [[conf[i][t + 1] - conf[i][t] for t in range(len(conf[i]) - 1)] + [outcome[i]] for i in range(B)]
    out = []
    for i in range(B):
        pool = [x for j in range(B) if groups[j] == groups[i] for x in r[j]]
        m = sum(pool) / len(pool)
        sd = math.sqrt(sum((x - m) ** 2 for x in pool) / len(pool)) if len(pool) > 1 else 1.0
        z = [(x - m) / (sd + eps) for x in r[i]]
        acc, row = 0.0, []
        for t in range(len(z) - 1, -1, -1):
            acc = z[t] + gamma * acc
            row.append(acc)
        out.append(row[::-1])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference(seed):
    rng = random.Random(seed)
    B = 7
    groups = [rng.choice([0, 3]) for _ in range(B)]
    turns = [rng.randint(1, 4) for _ in range(B)]
    conf = [[rng.random() for _ in range(k)] for k in turns]
    outcome = [rng.choice([0.0, 1.0, 0.5]) for _ in range(B)]
    b = with_conf(episode_batch([[0.0] * k for k in turns], groups, rewards=outcome, max_turns=4,
                                tokens=[[rng.randint(1, 2) for _ in range(k)] for k in turns], pad=1), conf)
    gamma = rng.choice([1.0, 0.8])
    got = per_turn(IGPOAdvantage(gamma=gamma)(b), b)
    ref = loop_igpo(conf, outcome, groups, gamma, 1e-6)
    for g, w in zip(got, ref):
        assert g == pytest.approx(w, abs=1e-4)


def test_multi_turn_without_confidence_is_a_clear_error_and_config_errors():
    b = episode_batch([[0.0, 1.0], [0.0]])
    with pytest.raises(DataError, match="answer_confidence"):
        IGPOAdvantage()(b)
    with pytest.raises(ConfigError, match="advantage.gamma"):
        from_config(IGPOAdvantage, gamma=2.0)
