"""TOPR (arXiv:2503.14286): l_t = -w A_t log pi(y_t), w = 1 for A >= 0, sg(min(1, pi/mu)) for A < 0.

d l_t / d logp_t = -w A_t (the weight is a constant), so every gradient below is -w A.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenSum
from lmpo.methods.loss.reinforce import ReinforceLoss
from lmpo.methods.loss.topr import TOPRLoss
from factories import from_config, make_batch

F64 = torch.float64


def run(loss_fn, lp, old, adv, mask=None):
    lp = torch.as_tensor(lp, dtype=F64)
    old = torch.as_tensor(old, dtype=F64).clone().requires_grad_(True)
    B, T = lp.shape
    adv = torch.as_tensor(adv, dtype=F64)
    adv = adv[:, None].expand(B, T).clone() if adv.dim() == 1 else adv
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    b = make_batch([0.0] * B, None, mask, advantages=adv * mask, old_logprobs=old, dtype=F64)
    lp = lp.clone().requires_grad_(True)
    out = loss_fn(lp, b)
    out.per_token.sum().backward()
    assert old.grad is None or torch.all(old.grad == 0)
    return out.per_token.detach(), lp.grad, out.metrics


def test_hand_sequence_level():
    # Row 0 (card's worked example): A = -1, log pi(tau) = -4 - 6 = -10, log mu(tau) = -4 - 5 = -9
    #   -> pi/mu = e^-1 = 0.36788 -> w = 0.36788; l_t = -w A lp_t = 0.36788 * [-4, -6]; grad = -w A = 0.36788.
    # Row 1: A = +2, pi/mu = e^(1 + 2) > 1 but positives ignore the ratio: w = 1; l = -2 lp = [2, 6]; grad = -2.
    # Row 2: A = -1, pi/mu = e^2 > 1 -> truncated to 1: l = lp = [-1, -1]; grad = 1 (= on-policy REINFORCE).
    # Row 3: A = -0.5, tokens [-2, pad]; pi/mu = e^(-2 + 1) = e^-1 (pad ignored): l = 0.5 e^-1 (-2), grad 0.5 e^-1.
    w = math.exp(-1)
    loss, grad, m = run(TOPRLoss(), [[-4, -6], [-1, -3], [-1, -1], [-2, 9.0]], [[-4, -5], [-2, -5], [-2, -2], [-1, 0]],
                        [-1.0, 2.0, -1.0, -0.5], [[1, 1], [1, 1], [1, 1], [1, 0]])
    assert_close(loss, torch.tensor([[-4 * w, -6 * w], [2.0, 6.0], [-1.0, -1.0], [-w, 0.0]], dtype=F64))
    assert_close(grad, torch.tensor([[w, w], [-2.0, -2.0], [1.0, 1.0], [0.5 * w, 0.0]], dtype=F64))
    # negatives: tokens of rows 0, 2, 3 -> weights (w, w, 1, 1, w) over 5 tokens
    assert_close(m["loss/neg_weight_mean"], torch.tensor((3 * w + 2) / 5, dtype=F64))
    assert_close(m["loss/neg_frac"], torch.tensor(5 / 7))  # a float32 fraction


def test_hand_token_level():
    # A = -1, lp = [-1, -3], old = [-2, -2]: token ratios e^1 -> 1, e^-1 -> 0.36788.
    #   l = [-1, 0.36788 * -3]; grad = [1, 0.36788].  A = +1 row: l = -lp, grad -1 regardless of the ratios.
    w = math.exp(-1)
    loss, grad, _ = run(TOPRLoss(level="token"), [[-1, -3], [-1, -3]], [[-2, -2], [-2, -2]], [-1.0, 1.0])
    assert_close(loss, torch.tensor([[-1.0, -3 * w], [1.0, 3.0]], dtype=F64))
    assert_close(grad, torch.tensor([[1.0, w], [-1.0, -1.0]], dtype=F64))


def test_positive_and_negative_weights():
    # positive_weight 0.5 halves the positive row; negative_weight 2 doubles the tapered negative row.
    loss, grad, _ = run(TOPRLoss(positive_weight=0.5, negative_weight=2.0), [[-1.0], [-1.0]], [[-1.0], [0.0]],
                        [1.0, -1.0])
    assert_close(grad, torch.tensor([[-0.5], [2 * math.exp(-1)]], dtype=F64))


def test_card_properties():
    g = torch.Generator().manual_seed(0)
    lp, old = -torch.rand(4, 5, generator=g, dtype=F64) * 3, -torch.rand(4, 5, generator=g, dtype=F64) * 3
    # (a) all-positive batch: exactly SFT scaled by A (= REINFORCE, no ratio at all), however stale the data.
    adv = torch.rand(4, generator=g, dtype=F64) + 0.1
    _, g_topr, _ = run(TOPRLoss(), lp, old, adv)
    _, g_rf, _ = run(ReinforceLoss(), lp, old, adv)
    assert_close(g_topr, g_rf)
    # (b) negatives: gradient is REINFORCE's times min(1, pi/mu) -> never larger in magnitude.
    _, g_topr, _ = run(TOPRLoss(), lp, old, -adv)
    _, g_rf, _ = run(ReinforceLoss(), lp, old, -adv)
    seq_ratio = (lp - old).sum(-1).exp()
    assert_close(g_topr, g_rf * seq_ratio.clamp(max=1.0)[:, None])
    assert torch.all(g_topr.abs() <= g_rf.abs() + 1e-15)


def test_config_errors():
    with pytest.raises(ConfigError, match="loss.level"):
        from_config(TOPRLoss, level="sentence")
    with pytest.raises(ConfigError, match="negative_weight"):
        from_config(TOPRLoss, negative_weight=-1.0)
    assert TOPRLoss.needs == frozenset({"old_logprobs"})


# --------------------------------------------------------------------------- loop reference
def loop_topr(lp, old, adv, mask, level, pw, nw):
    B, T = len(lp), len(lp[0])
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        seq = sum(lp[i][t] - old[i][t] for t in range(T) if mask[i][t])
        for t in range(T):
            if not mask[i][t]:
                continue
            a = adv[i][t]
            if a >= 0:
                w = pw
            else:
                r = math.exp(seq if level == "sequence" else lp[i][t] - old[i][t])
                w = nw * min(1.0, r)
            loss[i][t], grad[i][t] = -w * a * lp[i][t], -w * a
    return torch.tensor(loss, dtype=F64), torch.tensor(grad, dtype=F64)


def random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    lp = old + torch.randn(B, T, generator=g, dtype=F64) * 0.5
    adv = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    return lp, old, adv * mask, mask


@pytest.mark.parametrize("level, pw, nw", [("sequence", 1.0, 1.0), ("token", 1.0, 1.0), ("sequence", 0.3, 2.0)])
def test_matches_loop_reference(level, pw, nw):
    for seed in range(10):
        lp, old, adv, mask = random_inputs(seed)
        loss, grad, _ = run(TOPRLoss(level=level, positive_weight=pw, negative_weight=nw), lp, old, adv, mask)
        ref_loss, ref_grad = loop_topr(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), level, pw, nw)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_aggregated_gradient_is_the_papers_estimator(level):
    # The weight is a stop-gradient constant, so finite differences (gradcheck) would differentiate through it;
    # instead compare with the analytic estimator of Sec. 3: grad = (1/N) sum_i -w_i R_i grad log pi(tau_i), i.e.
    # d/d lp_{i,t} = -w_{i,t} A_{i,t} / N with N the number of sequences (seq_mean_token_sum).
    lp, old, adv, mask = random_inputs(3)
    b = make_batch([0.0] * lp.shape[0], None, mask, advantages=adv, old_logprobs=old, dtype=F64)
    agg = SeqMeanTokenSum()
    x = lp.clone().requires_grad_(True)
    agg(TOPRLoss(level=level)(x, b).per_token, mask, agg.normaliser(mask, 0)).backward()
    _, ref_grad = loop_topr(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), level, 1.0, 1.0)
    assert_close(x.grad, ref_grad / mask.any(-1).sum())
