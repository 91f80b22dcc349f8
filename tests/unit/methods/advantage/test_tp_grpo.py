"""TP-GRPO (arXiv:2507.23317): step verdicts -> thoughts -> ability-adaptive process shaping, GRPO-normalised."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.advantage.tp_grpo import TPGRPOAdvantage, merge_thoughts, token_verdicts
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.loss.ppo_clip import PPOClipLoss

from factories import from_config, random_full_batch, step_batch, with_extras

F64 = torch.float64


def test_hand_case():
    # group of 4: A correct with a wrong step, B correct all right, C wrong with a right step, D wrong all wrong.
    # p = 0.5, lam = 0.5: lambda_c = 0.25, lambda_w = 0.25. Steps of 1 token each.
    # r: A = (1, 0.75), B = (1, 1), C = (0.25, 0), D = (0, 0); mean_g R = 0.5, Bessel std of (1,1,0,0) = sqrt(1/3)
    b = step_batch([[(1.0, 1), (-1.0, 1)], [(1.0, 1), (1.0, 1)], [(1.0, 1), (-1.0, 1)], [(-1.0, 1), (-1.0, 1)]],
                   rewards=[1.0, 1.0, 0.0, 0.0])
    tp = TPGRPOAdvantage(lam=0.5)
    assert tp.token_rewards(b).tolist() == [[1.0, 0.75], [1.0, 1.0], [0.25, 0.0], [0.0, 0.0]]
    s = math.sqrt(1 / 3) + 1e-6
    exp = (torch.tensor([[1.0, 0.75], [1.0, 1.0], [0.25, 0.0], [0.0, 0.0]], dtype=F64) - 0.5) / s
    assert_close(tp(b).double(), exp, atol=1e-5, rtol=0)


def test_agreeing_verdicts_are_grpo_and_ability_adapts():
    # every step agrees with the outcome -> GRPO exactly (the card's property)
    b = step_batch([[(1.0, 2), (0.5, 1)], [(-1.0, 3)], [(0.2, 1)], [(-0.3, 2), (-0.1, 1)]],
                   rewards=[1.0, 0.0, 1.0, 0.0], group_ids=[0, 0, 1, 1])
    assert_close(TPGRPOAdvantage()(b), GRPOAdvantage()(b.replace(token_rewards=None)), atol=1e-5, rtol=0)
    # ability: the penalty on a wrong thought of a right answer grows with the group accuracy
    easy = step_batch([[(-1.0, 1)], [(1.0, 1)], [(1.0, 1)], [(1.0, 1)]], rewards=[1.0, 1.0, 1.0, 0.0])
    hard = step_batch([[(-1.0, 1)], [(-1.0, 1)], [(-1.0, 1)], [(-1.0, 1)]], rewards=[1.0, 0.0, 0.0, 0.0])
    tp = TPGRPOAdvantage()
    assert 1 - tp.token_rewards(easy)[0, 0] == pytest.approx(0.5 * 0.75)
    assert 1 - tp.token_rewards(hard)[0, 0] == pytest.approx(0.5 * 0.25)


def test_thought_merging_is_idempotent_for_token_rewards():
    assert merge_thoughts([1, 1, -1, -1, -1, 1, 0, 0]) == [(0, 1, 1), (2, 4, -1), (5, 5, 1), (6, 7, 0)]
    # the same reply written as 4 steps or as its 2 merged thoughts gets the same token rewards
    steps = step_batch([[(1.0, 1), (0.7, 2), (-0.2, 1), (-1.0, 1)], [(1.0, 5)]], rewards=[1.0, 0.0])
    thoughts = step_batch([[(1.0, 3), (-1.0, 2)], [(1.0, 5)]], rewards=[1.0, 0.0])
    assert torch.equal(TPGRPOAdvantage().token_rewards(steps), TPGRPOAdvantage().token_rewards(thoughts))


@pytest.mark.parametrize("seed", range(3))
def test_matches_loop_reference(seed):
    b = with_extras(random_full_batch(seed=seed, T=6), {"step_rewards"}, seed=seed)
    b = b.replace(rewards=(b.rewards > 0.5).float())
    got = TPGRPOAdvantage(lam=0.4)(b)
    for i in range(b.batch_size):
        grp = [j for j in range(b.batch_size) if b.group_ids[j] == b.group_ids[i]]
        Rs = [float(b.rewards[j]) for j in grp]
        p = sum(r >= 0.5 for r in Rs) / len(Rs)
        mu = sum(Rs) / len(Rs)
        sd = math.sqrt(sum((x - mu) ** 2 for x in Rs) / (len(Rs) - 1))
        s = sd + 1e-6 if sd > 0 else 1.0
        R = float(b.rewards[i])
        for t in range(6):
            if not b.response_mask[i, t]:
                assert float(got[i, t]) == 0.0
                continue
            k = int(b.turn_ids[i, t])
            v = math.copysign(1, float(b.extras["step_rewards"][i, k])) if b.extras["step_rewards"][i, k] else 0
            r = R - (0.4 * p if R >= 0.5 and v < 0 else 0) + (0.4 * (1 - p) if R < 0.5 and v > 0 else 0)
            assert float(got[i, t]) == pytest.approx((r - mu) / s, abs=1e-5)


def test_gradient_through_the_clipped_loss():
    # single reply (s = 1, mean = R = 1), its one step wrong: p = 1 -> r = 1 - 0.5 = 0.5, A = -0.5
    b = step_batch([[(-1.0, 1)]], rewards=[1.0])
    adv = TPGRPOAdvantage()(b)
    assert adv.item() == pytest.approx(-0.5)
    z = torch.tensor([0.4, 0.1], dtype=F64, requires_grad=True)
    lp = torch.log_softmax(z, -1)[0].expand(1, 1)
    batch = b.replace(advantages=adv, old_logprobs=lp.detach().float())
    out = PPOClipLoss(epsilon=0.2)(lp, batch)
    agg = TokenMean()
    agg(out.per_token, batch.response_mask, agg.normaliser(batch.response_mask, 1)).backward()
    p = torch.softmax(z.detach(), -1)
    assert_close(z.grad, torch.tensor([0.5 * (1 - p[0]), -0.5 * p[1]], dtype=F64), atol=1e-6, rtol=1e-5)


def test_token_verdicts_and_config():
    b = step_batch([[(0.3, 2), (-0.2, 1)], [(0.0, 2)]])
    assert token_verdicts(b).tolist() == [[1, 1, -1], [0, 0, 0]]
    with pytest.raises(ConfigError, match="lam"):
        from_config(TPGRPOAdvantage, lam=2.0)
