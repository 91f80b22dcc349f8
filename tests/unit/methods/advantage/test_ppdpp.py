"""PPDPP (arXiv:2311.00262): discounted turn returns standardised within each episode, REINFORCE on the acts."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.ppdpp import PPDPPAdvantage, standardised_returns
from lmpo.methods.aggregate import SeqMeanTokenSum
from lmpo.methods.loss.reinforce import ReinforceLoss
from factories import from_config, tool_episode_batch


def test_card_a_equal_returns_give_no_signal():
    # rewards [0, 0, 1], gamma 1 -> returns [1, 1, 1] -> standardised 0 on every turn: zero loss
    b = tool_episode_batch([[(1, 1), (1, 1), (2, 0)]], turn_rewards=[[0.0, 0.0, 1.0]])
    adv = PPDPPAdvantage(gamma=1.0)(b)
    assert torch.equal(adv, torch.zeros_like(adv))


def test_card_b_by_hand():
    # gamma 0.5, rewards [-0.5, 1.0] -> returns [0.0, 1.0] -> standardised [-0.707, 0.707] (Bessel std 0.7071)
    b = tool_episode_batch([[(2, 1), (1, 0)]], turn_rewards=[[-0.5, 1.0]])
    adv = PPDPPAdvantage(gamma=0.5, eps=0.0)(b)
    s = 1 / math.sqrt(2)
    assert_close(adv, torch.tensor([[-s, -s, 0.0, s]]))  # turn 0: 2 tokens, its observation (0), turn 1: 1 token


def test_each_episode_is_its_own_baseline_and_one_turn_keeps_its_return():
    r = torch.tensor([[3.0, 1.0, 2.0], [5.0, 0.0, 0.0], [1.0, 4.0, 0.0]], dtype=torch.float64)
    z = standardised_returns(r, torch.tensor([3, 1, 2]), eps=0.0)
    assert_close(z[0], (r[0] - 2.0) / 1.0)  # mean 2, Bessel std 1
    assert z[1].tolist() == [5.0, 0.0, 0.0]  # one turn: raw return, nothing after it
    assert_close(z[2, :2], torch.tensor([-1.0, 1.0], dtype=torch.float64) / math.sqrt(2))  # mean 2.5, std 2.12
    assert z[2, 2] == 0


def test_gradient_is_minus_the_standardised_return_on_each_act():
    """L = - sum_t log pi(a_t) G^_t: the preset's loss and aggregator give d L / d log pi = -G^_t on every token of
    act t (the per-sequence token sum, one episode)."""
    b = tool_episode_batch([[(2, 1), (1, 0)]], turn_rewards=[[-0.5, 1.0]])
    adv = PPDPPAdvantage(gamma=0.5, eps=0.0)(b)
    lp = torch.zeros(b.response_ids.shape, requires_grad=True)
    per_token = ReinforceLoss()(lp, b.replace(advantages=adv)).per_token
    agg = SeqMeanTokenSum()
    agg(per_token, b.response_mask, agg.normaliser(b.response_mask, 4)).backward()
    assert_close(lp.grad, -adv * b.response_mask)


def test_errors():
    with pytest.raises(ConfigError, match="gamma"):
        from_config(PPDPPAdvantage, gamma=1.5)
