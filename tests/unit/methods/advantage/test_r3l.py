"""R3L (arXiv:2601.03715): positive amplification, pivotal credit mask, and the OPMD loss it trains with."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.advantage.r3l import R3LAdvantage, pivot_mask
from lmpo.methods.loss.opmd import OPMDLoss
from factories import tool_episode_batch, from_config, make_batch, run_token_loss


def test_card_worked_example():
    # rewards (1, 0.4, 0, 0): b = 0.35 -> scores (0.65, 0.05, -0.35, -0.35); row 0 solved -> 1;
    # row 1 above the baseline -> 3 * 0.05 = 0.15; rows 2, 3 keep -0.35
    b = make_batch([1.0, 0.4, 0.0, 0.0], [0, 0, 0, 0], T=2)
    assert_close(R3LAdvantage()(b)[:, 0], torch.tensor([1.0, 0.15, -0.35, -0.35]))
    # a group of one has baseline 0 (the released code): R = 0.5 -> alpha * 0.5 = 1.5; R = -0.2 -> -0.2
    b = make_batch([0.5, -0.2], [0, 1], T=1)
    assert_close(R3LAdvantage()(b)[:, 0], torch.tensor([1.5, -0.2]))


def test_logavgexp_baseline_by_hand():
    # rewards (0.5, 0, 0), tau 1: b = log((e^0.5 + 1 + 1) / 3) = log(1.21624) = 0.19577
    b = make_batch([0.5, 0.0, 0.0], [0, 0, 0], T=1)
    base = math.log((math.exp(0.5) + 2) / 3)
    want = torch.tensor([3 * (0.5 - base), -base, -base], dtype=torch.float32)
    assert_close(R3LAdvantage(baseline="logavgexp")(b)[:, 0], want)
    # tau 0.5 changes the baseline: b = 0.5 log((e^1 + 2) / 3)
    base = 0.5 * math.log((math.e + 2) / 3)
    assert_close(R3LAdvantage(baseline="logavgexp", tau=0.5)(b)[1, 0], torch.tensor(-base, dtype=torch.float32))


def test_card_pivot_mask_and_alpha1_is_mean_baseline():
    # a 4-turn episode (each turn 2 policy + 1 observation tokens), pivot k = 2: exactly turns 2 and 3 are trained
    turns = [[(2, 1)] * 4, [(2, 1)] * 4]
    b = tool_episode_batch(turns, rewards=[0.0, 0.5], extras={"pivot_turn": torch.tensor([2.0, -1.0])})
    keep = pivot_mask(b)
    trained = b.response_mask & keep
    assert b.turn_ids[0][trained[0]].unique().tolist() == [2, 3]
    assert torch.equal(trained[1], b.response_mask[1])  # no pivot: everything
    adv = R3LAdvantage()(b)
    assert torch.all(adv[~trained] == 0)
    assert torch.equal(R3LAdvantage().token_mask(b), keep)
    # alpha = 1, nothing solved, no pivot: mean-baseline REINFORCE (Dr. GRPO without std)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        rb = make_batch(torch.rand(8, generator=g) * 0.9, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2]), T=3)
        assert_close(R3LAdvantage(alpha=1.0)(rb), GRPOAdvantage(scale_by_std=False)(rb))


def loop_r3l(rewards, groups, alpha):
    out = []
    for i, r in enumerate(rewards):
        same = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        b = sum(same) / len(same) if len(same) > 1 else 0.0
        s = r - b
        out.append(1.0 if r >= 1.0 else (alpha * s if s >= 0 else s))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    groups = torch.tensor([3, 3, 3, 7, 7, 1, 9, 9, 9, 9])[torch.randperm(10, generator=g)]
    rewards = (torch.randint(0, 5, (10,), generator=g).float() / 4)  # 0, .25, ..., 1
    mask = torch.rand(10, 4, generator=g) > 0.3
    ref = torch.tensor(loop_r3l(rewards.tolist(), groups.tolist(), 2.5))
    assert_close(R3LAdvantage(alpha=2.5)(make_batch(rewards, groups, mask)), ref[:, None] * mask)


def test_opmd_loss_value_and_gradient():
    # l = -A log pi / (1 + tau): A = (2, -1), log pi = old + logr with old = -1
    logr = torch.tensor([[0.1, -0.2], [0.3, 0.0]])
    per_token, grad, _ = run_token_loss(OPMDLoss(tau=1.0), logr, torch.tensor([2.0, -1.0]))
    lp = -1.0 + logr.double()
    assert_close(per_token, -torch.tensor([[2.0], [-1.0]], dtype=torch.float64) * lp / 2)
    assert_close(grad, torch.tensor([[-1.0, -1.0], [0.5, 0.5]], dtype=torch.float64))  # d/d logpi = -A / 2
    _, grad0, _ = run_token_loss(OPMDLoss(tau=0.0), logr, torch.tensor([2.0, -1.0]), mask=[[1, 0], [1, 1]])
    assert_close(grad0, torch.tensor([[-2.0, 0.0], [1.0, 1.0]], dtype=torch.float64))


def test_config_errors():
    for cls, kw, key in ((R3LAdvantage, {"alpha": -1.0}, "advantage.alpha"),
                         (R3LAdvantage, {"baseline": "max"}, "baseline"), (R3LAdvantage, {"tau": 0.0}, "tau"),
                         (OPMDLoss, {"tau": -0.5}, "loss.tau")):
        with pytest.raises(ConfigError, match=key):
            from_config(cls, **kw)
