"""DRO (arXiv:2405.19107; Kimi k1.5 arXiv:2501.12599): l_t = -(A log pi - beta/2 (log pi - log pi_old)^2)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.loss.dro import DROLoss
from factories import from_config, run_token_loss

F64 = torch.float64


def test_hand_case():
    # old = -1, log r = [0.5, -1, 0 (pad)], A = 2, beta = 0.4: log pi = [-0.5, -2]
    #   l = -(2 * -0.5 - 0.2 * 0.25) = 1.05;  -(2 * -2 - 0.2 * 1) = 4.2
    #   grad = -A + beta d = -2 + 0.2 = -1.8;  -2 - 0.4 = -2.4
    loss, grad, m = run_token_loss(DROLoss(beta=0.4), [[0.5, -1.0, 0.0]], [2.0], [[1, 1, 0]])
    assert_close(loss, torch.tensor([[1.05, 4.2, 0.0]], dtype=F64))
    assert_close(grad, torch.tensor([[-1.8, -2.4, 0.0]], dtype=F64))
    assert_close(m["loss/log_ratio_sq"], torch.tensor(0.625, dtype=F64))


def test_card_property_the_penalty_pulls_back_in_proportion_and_vanishes_on_policy():
    g = torch.Generator().manual_seed(1)
    logr = torch.randn(3, 4, generator=g, dtype=F64)
    adv = torch.randn(3, generator=g, dtype=F64)
    _, grad, _ = run_token_loss(DROLoss(beta=0.7), logr, adv)
    assert_close(grad, -adv[:, None] + 0.7 * logr)  # policy gradient + beta * displacement
    _, grad0, _ = run_token_loss(DROLoss(beta=0.7), torch.zeros(3, 4, dtype=F64), adv)
    assert_close(grad0, -adv[:, None].expand(3, 4))  # on-policy: REINFORCE
    # the loss is minimised (for fixed A) at log r = A / beta: the stationary point of the per-token objective
    lr = (adv / 0.7)[:, None].expand(3, 4)
    _, g_star, _ = run_token_loss(DROLoss(beta=0.7), lr, adv)
    assert_close(g_star, torch.zeros(3, 4, dtype=F64))


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    logr = torch.randn(3, 5, generator=g, dtype=F64)
    adv = torch.randn(3, 5, generator=g, dtype=F64)
    mask = torch.rand(3, 5, generator=g) > 0.3
    loss, _, _ = run_token_loss(DROLoss(beta=0.3), logr, adv, mask)
    for i in range(3):
        for t in range(5):
            lp = -1.0 + logr[i, t].item()
            exp = -(adv[i, t].item() * lp - 0.15 * logr[i, t].item() ** 2) if mask[i, t] else 0.0
            assert abs(loss[i, t].item() - exp) < 1e-12


def test_config_errors():
    with pytest.raises(ConfigError, match="loss.beta"):
        from_config(DROLoss, beta=0.0)
