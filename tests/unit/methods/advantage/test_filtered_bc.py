"""Filtered BC (arXiv:2404.14367's no-negative-gradient arm): A_i = 1[r_i > threshold], never negative."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from lmpo.methods.advantage.filtered_bc import FilteredBC
from lmpo.methods.loss.reinforce import ReinforceLoss
from factories import from_config, make_batch, random_batch


def test_hand_case():
    # rewards [1, 0, 0.7, 0.2], threshold 0.5 -> kept rows 0 and 2; token-rewards add to the outcome: row 3 gets
    # 0.2 + 0.4 = 0.6 > 0.5 -> kept too.
    b = make_batch([1.0, 0.0, 0.7, 0.2], [0, 0, 1, 1], [2, 1, 2, 2], token_rewards=[[0, 0], [0, 0], [0, 0], [0.4, 0]])
    adv = from_config(FilteredBC)(b)
    assert_close(adv, torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))


def test_card_property_no_negative_gradient():
    # With reinforce, the gradient on every token is -A_t <= 0 for the log-prob (only raises likelihoods): no sample
    # is ever pushed down, whatever the rewards.
    for seed in range(5):
        b = random_batch(seed)
        adv = from_config(FilteredBC, threshold=0.0)(b)
        assert torch.all(adv >= 0) and torch.all(adv[~b.response_mask] == 0)
        lp = torch.zeros(b.response_mask.shape, requires_grad=True)
        ReinforceLoss()(lp, b.replace(advantages=adv)).per_token.sum().backward()
        assert torch.all(lp.grad <= 0)
