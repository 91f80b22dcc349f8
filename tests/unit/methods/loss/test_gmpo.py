"""GMPO (arXiv:2507.20673): l_i = -A_i exp(mean_t pessimistic-clipped log r_t), spread as l_i / |o_i| per token."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenSum
from lmpo.methods.loss.gmpo import GMPOLoss
from factories import from_config, run_token_loss, token_loss_inputs

F64 = torch.float64


def test_hand_case():
    # eps = 0.4; row 0: A = +1, log r = [0.1, 0.6 (-> 0.4), -0.9] -> mean (0.1 + 0.4 - 0.9)/3 = -0.4/3
    #   s_0 = e^(-0.4/3); loss_0 = -s_0; per token -s_0/3; gradient: d/dlogr_t of -exp(mean) = -s_0/3 on unclipped
    #   tokens (0 and 2), 0 on the clipped one (1)
    # row 1: A = -2, log r = [-0.6 (-> -0.4), 0.3, pad] -> mean (-0.4 + 0.3)/2 = -0.05; s_1 = e^-0.05;
    #   loss_1 = 2 s_1; per token s_1; gradient 2 s_1 / 2 = s_1 on token 1, 0 on the clipped token 0
    logr = [[0.1, 0.6, -0.9], [-0.6, 0.3, 0.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    loss, grad, m = run_token_loss(GMPOLoss(), logr, [1.0, -2.0], mask)
    s0, s1 = math.exp(-0.4 / 3), math.exp(-0.05)
    assert_close(loss, torch.tensor([[-s0 / 3] * 3, [s1, s1, 0.0]], dtype=F64))
    assert_close(grad, torch.tensor([[-s0 / 3, 0.0, -s0 / 3], [0.0, s1, 0.0]], dtype=F64))
    assert_close(m["loss/clip_frac"], torch.tensor(2 / 5))


def test_card_property_an_outlier_token_barely_moves_the_sequence_ratio():
    # one token with ratio e^5 among 9 at ratio 1: GRPO's arithmetic mean of ratios grows by (e^5 - 1)/10 ~ 14.7,
    # GMPO's geometric-mean ratio by at most e^(0.4/10) (the clip bounds the token, the 1/|o| root shrinks it)
    logr = torch.zeros(1, 10, dtype=F64)
    logr[0, 3] = 5.0
    loss, _, _ = run_token_loss(GMPOLoss(), logr, [1.0])
    s = -loss.sum().item()
    assert 1.0 < s <= math.exp(0.04) + 1e-12
    # pessimism: with A < 0 the same up-move is not clipped from below, so the ratio is exp(5/10) (no bonus taken)
    loss, _, _ = run_token_loss(GMPOLoss(), logr, [-1.0])
    assert abs(loss.sum().item() - math.exp(0.5)) < 1e-9


def loop_gmpo(logr, adv, mask, lo, hi):
    out = []
    for i in range(len(logr)):
        toks = [t for t in range(len(logr[i])) if mask[i][t]]
        if not toks:
            out.append(0.0)
            continue
        a = sum(adv[i][t] for t in toks) / len(toks)
        sgn = (a > 0) - (a < 0)
        acc = 0.0
        for t in toks:
            x = logr[i][t]
            c = min(max(x, -lo), hi)
            acc += sgn * min(sgn * x, sgn * c)
        out.append(-a * math.exp(acc / len(toks)))
    rows = sum(1 for i in range(len(logr)) if any(mask[i]))
    return sum(out) / max(rows, 1)


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference_and_gradcheck(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 5
    logr = torch.randn(B, T, generator=g, dtype=F64) * 0.5
    adv = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.3
    comp, agg = GMPOLoss(epsilon=0.3, epsilon_high=0.5), SeqMeanTokenSum()
    b, lp = token_loss_inputs(logr, adv, mask)
    total = agg(comp(lp, b).per_token, mask, agg.normaliser(mask, T))
    exp = loop_gmpo(logr.tolist(), (adv * mask).tolist(), mask.tolist(), 0.3, 0.5)
    assert abs(total.item() - exp) < 1e-10
    assert torch.autograd.gradcheck(lambda x: agg(comp(x, b).per_token, mask, agg.normaliser(mask, T)), (lp,))


def test_config_errors():
    with pytest.raises(ConfigError, match="loss.epsilon"):
        from_config(GMPOLoss, epsilon=-0.1)
