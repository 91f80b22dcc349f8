"""EPO-Strategic (arXiv:2502.12486): discounted per-turn returns, max-abs normalised, weighting each turn's NLL."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.epo_strategic import EPOStrategicAdvantage, discounted_normalised
from lmpo.methods.aggregate import SeqMeanTokenSum
from lmpo.methods.loss.reinforce import ReinforceLoss
from factories import from_config, make_batch, tool_episode_batch


def test_card_return_computation():
    # rewards [0, 1, 0, 0.8], gamma 0.99: G4 = 0.8, G3 = 0.792, G2 = 1 + 0.99 * 0.792 = 1.78408,
    # G1 = 0.99 * 1.78408 = 1.7662392; max |G| = 1.78408 -> Ghat = [0.99, 1, 0.443926, 0.448410]
    r = torch.tensor([[0.0, 1.0, 0.0, 0.8, 0.0]], dtype=torch.float64)
    ghat = discounted_normalised(r, torch.tensor([4]), 0.99)
    G = torch.tensor([1.7662392, 1.78408, 0.792, 0.8, 0.0], dtype=torch.float64)
    assert_close(ghat[0], G / 1.78408)
    assert ghat[0, :4].tolist() == pytest.approx([0.990, 1.000, 0.4439, 0.4484], abs=1e-4)
    assert discounted_normalised(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([3]), 0.99).abs().sum() == 0


def test_weights_by_hand_and_critical_turns():
    # row 0: turns with 2 and 1 policy tokens, turn rewards [0, 1] -> G = [0.99, 1] -> Ghat = [0.99, 1]
    #   segment_mean: turn 0 tokens weigh 0.99 / (2 * 2), turn 1's 1 / (1 * 2)
    # row 1: one turn of 3 tokens, reward 0.5 -> Ghat = 1 -> each token 1 / 3
    b = tool_episode_batch([[(2, 1), (1, 0)], [(3, 0)]], turn_rewards=[[0.0, 1.0], [0.5]])
    w = EPOStrategicAdvantage()(b)
    assert_close(w[0], torch.tensor([0.99 / 4, 0.99 / 4, 0.0, 0.5]))
    assert_close(w[1], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    raw = EPOStrategicAdvantage(segment_mean=False)(b)
    assert_close(raw[0], torch.tensor([0.99, 0.99, 0.0, 1.0]))
    # the judge marks turn 0 of row 0 critical: rewards [1, 1] -> G = [1.99, 1] -> Ghat = [1, 1/1.99]
    b2 = b.replace(extras={**b.extras, "critical_turns": torch.tensor([[1.0, 0.0], [0.0, 0.0]])})
    assert_close(EPOStrategicAdvantage(segment_mean=False)(b2)[0], torch.tensor([1.0, 1.0, 0.0, 1 / 1.99]))
    # single-turn text: one turn, reward = the outcome, Ghat = sign(R)
    assert_close(EPOStrategicAdvantage(segment_mean=False)(make_batch([0.3, -2.0, 0.0], T=2))[:, 0],
                 torch.tensor([1.0, -1.0, 0.0]))


def test_card_property_unit_returns_give_plain_sft():
    # all Ghat = 1 (each turn critical, gamma = 0 so G_t = r_t = 1): the loss is the code's SFT loss, the mean over
    # turns of each turn's mean NLL, averaged over episodes
    b = tool_episode_batch([[(2, 1), (3, 0)], [(1, 0)]], turn_rewards=[[1.0, 1.0], [1.0]])
    w = EPOStrategicAdvantage(gamma=0.0)(b)
    lp = -torch.rand(b.response_mask.shape, generator=torch.Generator().manual_seed(0))
    lp = (lp * b.response_mask).requires_grad_(True)
    per_token = ReinforceLoss()(lp, b.replace(advantages=w)).per_token
    agg = SeqMeanTokenSum()
    loss = agg(per_token, b.response_mask, agg.normaliser(b.response_mask, 0))
    m = b.response_mask
    ep0 = -(lp[0, :2].mean() + lp[0, 3:6].mean()) / 2
    ep1 = -lp[1, 0]
    assert_close(loss, (ep0 + ep1) / 2)
    # gradient (analytic): d loss / d logp_j = -w_j / 2 (two episodes)
    loss.backward()
    assert_close(lp.grad, -(w * m) / 2)


def loop_weights(turns, turn_rewards, gamma, seg):
    out = []
    for row, tr in zip(turns, turn_rewards):
        S = len(row)
        G, acc = [0.0] * S, 0.0
        for t in reversed(range(S)):
            acc = gamma * acc + tr[t]
            G[t] = acc
        top = max(abs(x) for x in G)
        gh = [x / top if top else 0.0 for x in G]
        line = []
        for t, (p, o) in enumerate(row):
            line += [gh[t] / (p * S) if seg else gh[t]] * p + [0.0] * o
        out.append(line)
    T = max(len(x) for x in out)
    return torch.tensor([x + [0.0] * (T - len(x)) for x in out])


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    turns = [[(int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(0, 3, (1,), generator=g)))
              for _ in range(int(torch.randint(1, 5, (1,), generator=g)))] for _ in range(5)]
    tr = [(torch.rand(len(t), generator=g) * (torch.rand(len(t), generator=g) > 0.5)).tolist() for t in turns]
    b = tool_episode_batch(turns, turn_rewards=tr)
    for seg in (True, False):
        ref = loop_weights(turns, tr, 0.9, seg)
        assert_close(EPOStrategicAdvantage(gamma=0.9, segment_mean=seg)(b), ref, atol=1e-6, rtol=1e-5)


def test_config_errors():
    for kw in ({"gamma": 1.5}, {"gamma": -0.1}):
        with pytest.raises(ConfigError, match="advantage.gamma"):
            from_config(EPOStrategicAdvantage, **kw)
