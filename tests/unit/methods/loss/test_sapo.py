"""SAPO soft gate (arXiv:2511.20347).

l_t = -(4/tau) sigmoid(tau (r - 1)) A,   dl/dlogp = -A * sech^2(tau (r - 1)/2) * r   (d r / d logp = r),
tau = tau_pos for A > 0 and tau_neg otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.sapo import SAPOLoss
from factories import from_config, make_batch, run_token_loss

F64 = torch.float64


run = run_token_loss


def sech2(x):
    return 1.0 / math.cosh(x) ** 2


def test_hand_card_weights():
    # Card values, tau_pos = 1, tau_neg = 1.05, A = +1 / -1 rows, r = [1, 1.5, 3]:
    # A = +1: loss = -4 sigmoid(r - 1): r=1 -> -2; gradient -A w r with w = sech^2((r-1)/2):
    #   r=1: w=1, g=-1 | r=1.5: w=sech^2(0.25)=0.94001, g=-1.41002 | r=3: w=sech^2(1)=0.41997, g=-1.25992
    # A = -1: loss = +(4/1.05) sigmoid(1.05 (r - 1)); r=1.5: w = sech^2(0.2625) = 0.93414, g = +1.40121
    loss, grad, m = run(SAPOLoss(), [[0.0, math.log(1.5), math.log(3.0)]] * 2, [1.0, -1.0])
    assert loss[0, 0].item() == pytest.approx(-2.0, abs=1e-12)
    assert loss[1, 0].item() == pytest.approx(4 / 1.05 * 0.5, abs=1e-12)
    assert grad[0, 0].item() == pytest.approx(-1.0, abs=1e-12)
    assert grad[0, 1].item() / -1.5 == pytest.approx(0.94001, abs=1e-5)
    assert grad[0, 2].item() / -3.0 == pytest.approx(0.41997, abs=1e-5)
    assert grad[1, 1].item() / 1.5 == pytest.approx(0.93414, abs=1e-5)
    # the same r = 1.5 token under GRPO's clip 0.2 would get zero gradient; SAPO keeps 94% of it
    assert_close(m["loss/gate_weight_mean"], torch.tensor(
        (1 + sech2(0.25) + sech2(1.0) + 1 + sech2(0.2625) + sech2(1.05)) / 6, dtype=F64))


def test_card_property_weight_is_one_on_policy_and_tau_to_zero_is_unclipped_is():
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(3, 4, generator=g, dtype=F64)
    _, grad, _ = run(SAPOLoss(), torch.zeros(3, 4, dtype=F64), adv)
    assert_close(grad, -adv)  # on-policy: exactly the policy gradient -A
    logr = torch.randn(3, 4, generator=g, dtype=F64) * 0.5
    _, grad, _ = run(SAPOLoss(tau_pos=1e-6, tau_neg=1e-6), logr, adv)
    assert_close(grad, -adv * logr.exp(), rtol=1e-5, atol=1e-8)  # tau -> 0: plain IS gradient -A r
    # larger tau decays faster: the weight at r = 2 drops as tau grows
    w = [run(SAPOLoss(tau_pos=t), [[math.log(2.0)]], [1.0])[1].item() / -2.0 for t in (0.5, 1.0, 4.0)]
    assert w[0] > w[1] > w[2] > 0


def test_config_errors():
    with pytest.raises(ConfigError, match="loss.tau_pos"):
        from_config(SAPOLoss, tau_pos=0.0)
    with pytest.raises(ConfigError, match="loss.tau_neg"):
        from_config(SAPOLoss, tau_neg=-1.0)


def loop_sapo(logr, adv, mask, tp, tn):
    B, T = len(logr), len(logr[0])
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            r, a = math.exp(logr[i][t]), adv[i][t]
            tau = tp if a > 0 else tn
            s = 1.0 / (1.0 + math.exp(-tau * (r - 1.0)))
            loss[i][t] = -4.0 / tau * s * a
            grad[i][t] = -a * sech2(tau * (r - 1.0) / 2.0) * r
    return torch.tensor(loss, dtype=F64), torch.tensor(grad, dtype=F64)


@pytest.mark.parametrize("tp, tn", [(1.0, 1.05), (0.3, 2.0), (5.0, 5.0)])
def test_matches_loop_reference(tp, tn):
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        logr = torch.randn(B, T, generator=g, dtype=F64) * 0.7
        adv = torch.randn(B, T, generator=g, dtype=F64)
        mask = torch.rand(B, T, generator=g) > 0.25
        adv = adv * mask
        loss, grad, _ = run(SAPOLoss(tp, tn), logr, adv, mask)
        ref_loss, ref_grad = loop_sapo(logr.tolist(), adv.tolist(), mask.tolist(), tp, tn)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)


@pytest.mark.parametrize("seed", range(3))
def test_gradcheck_through_aggregator(seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(3, 5, generator=g) > 0.2
    mask[:, 0] = True
    old = -torch.rand(3, 5, generator=g, dtype=F64)
    b = make_batch([0.0] * 3, None, mask, advantages=torch.randn(3, 5, generator=g, dtype=F64) * mask,
                   old_logprobs=old, dtype=F64)
    agg = SeqMeanTokenMean()
    norm = agg.normaliser(mask, 0)
    lp = (old + 0.5 * torch.randn(3, 5, generator=g, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: agg(SAPOLoss()(x, b).per_token, mask, norm), (lp,))
