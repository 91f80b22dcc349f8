"""MinPRO (arXiv:2601.22718, reconstructed): l_t = sg(m_t) * l^PPO_t,  m_t = min_{i<t, trained} rho_i (1 if none).

Gradient: d l_t / d logp_t = m_t * d l^PPO_t / d logp_t; no gradient reaches earlier tokens through m_t.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.minpro import MinPROLoss, prefix_min_ratio
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import from_config, make_batch, run_token_loss

F64 = torch.float64


run = run_token_loss


def test_hand_card_example():
    # rho = [1.2, 0.5, 1.1, 0.9] -> prefix minima m = [1, 1.2, 0.5, 0.5] (cumulative products would be
    # [1, 1.2, 0.6, 0.66]).  A = +1, eps 0.2 / 0.28 -> PPO terms: 1.2 inside: -1.2, g -1.2 |
    # 0.5: -0.5, g -0.5 | 1.1: -1.1, g -1.1 | 0.9: -0.9, g -0.9.  MinPRO: loss = m * PPO, grad = m * g:
    # [-1.2, -0.6, -0.55, -0.45]
    rho = [1.2, 0.5, 1.1, 0.9]
    logr = [[math.log(x) for x in rho]]
    m = prefix_min_ratio(torch.tensor([rho], dtype=F64), torch.ones(1, 4, dtype=torch.bool))
    assert_close(m, torch.tensor([[1.0, 1.2, 0.5, 0.5]], dtype=F64))
    loss, grad, metrics = run(MinPROLoss(epsilon=0.2, epsilon_high=0.28), logr, [1.0])
    assert_close(loss, torch.tensor([[-1.2, -0.6, -0.55, -0.45]], dtype=F64))
    assert_close(grad, torch.tensor([[-1.2, -0.6, -0.55, -0.45]], dtype=F64))
    assert_close(metrics["loss/prefix_weight_mean"], torch.tensor(3.2 / 4, dtype=F64))
    # cap = 1 bounds the weight: m = [1, 1, 0.5, 0.5]
    loss, _, _ = run(MinPROLoss(epsilon=0.2, epsilon_high=0.28, cap=1.0), logr, [1.0])
    assert_close(loss, torch.tensor([[-1.2, -0.5, -0.55, -0.45]], dtype=F64))


def test_masked_positions_are_skipped_in_the_running_minimum():
    # rho = [2, 0.1 (tool token, not trained), 0.8, 1.5]; trained minima: m = [1, 2, 2, 0.8]
    r = torch.tensor([[2.0, 0.1, 0.8, 1.5]], dtype=F64)
    m = prefix_min_ratio(r, torch.tensor([[True, False, True, True]]))
    assert_close(m[0, [0, 2, 3]], torch.tensor([1.0, 2.0, 0.8], dtype=F64))


def test_card_properties_on_policy_is_grpo_and_weight_is_stop_gradient():
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(3, 5, generator=g, dtype=F64)
    mask = torch.rand(3, 5, generator=g) > 0.2
    loss, grad, _ = run(MinPROLoss(), torch.zeros(3, 5, dtype=F64), adv, mask)
    ref_loss, ref_grad, _ = run(PPOClipLoss(), torch.zeros(3, 5, dtype=F64), adv, mask)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    # a token's loss has no gradient w.r.t. earlier tokens' log-probs (the prefix weight is detached)
    old = torch.full((1, 4), -1.0, dtype=F64)
    b = make_batch([0.0], None, [[1, 1, 1, 1]], advantages=[[1.0, 1.0, 1.0, 1.0]], old_logprobs=old, dtype=F64)
    lp = (old + torch.tensor([[-0.5, 0.1, -0.3, 0.05]], dtype=F64)).requires_grad_(True)
    MinPROLoss()(lp, b).per_token[0, 3].backward()
    assert torch.all(lp.grad[0, :3] == 0) and lp.grad[0, 3] != 0


def test_config_errors():
    with pytest.raises(ConfigError, match="loss.epsilon"):
        from_config(MinPROLoss, epsilon=-0.1)
    with pytest.raises(ConfigError, match="loss.cap"):
        from_config(MinPROLoss, cap=0.0)


def loop_minpro(logr, adv, mask, eps):
    B, T = len(logr), len(logr[0])
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        m = None
        for t in range(T):
            if not mask[i][t]:
                continue
            r, a = math.exp(logr[i][t]), adv[i][t]
            if (a >= 0 and r > 1 + eps) or (a < 0 and r < 1 - eps):
                l, g = -a * min(max(r, 1 - eps), 1 + eps), 0.0
            else:
                l, g = -a * r, -a * r
            w = 1.0 if m is None else m
            loss[i][t], grad[i][t] = w * l, w * g
            m = r if m is None else min(m, r)
    return torch.tensor(loss, dtype=F64), torch.tensor(grad, dtype=F64)


def test_matches_loop_reference():
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
        logr = torch.randn(B, T, generator=g, dtype=F64) * 0.5
        adv = torch.randn(B, T, generator=g, dtype=F64)
        mask = torch.rand(B, T, generator=g) > 0.25
        loss, grad, _ = run(MinPROLoss(epsilon=0.2), logr, adv, mask)
        ref_loss, ref_grad = loop_minpro(logr.tolist(), (adv * mask).tolist(), mask.tolist(), 0.2)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)


def test_analytic_gradient_through_aggregator():
    # The weight is detached, so d(aggregate)/d logp_t = m_t * dl^PPO_t/dlogp_t / (|o_i| * B) under
    # seq-mean-token-mean; dl^PPO/dlogp = -A r inside the clip range (small log-ratios keep every token inside).
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(3, 5, generator=g) > 0.2
    mask[:, 0] = True
    old = -torch.rand(3, 5, generator=g, dtype=F64)
    adv = torch.randn(3, 5, generator=g, dtype=F64) * mask
    b = make_batch([0.0] * 3, None, mask, advantages=adv, old_logprobs=old, dtype=F64)
    agg = SeqMeanTokenMean()
    logr = 0.03 * torch.randn(3, 5, generator=g, dtype=F64)
    lp = (old + logr).requires_grad_(True)
    agg(MinPROLoss()(lp, b).per_token, mask, agg.normaliser(mask, 0)).backward()
    m = prefix_min_ratio(logr.exp(), mask)
    expect = m * (-adv * logr.exp()) / mask.sum(-1, keepdim=True) / 3
    assert_close(lp.grad, torch.where(mask, expect, torch.zeros_like(expect)))
