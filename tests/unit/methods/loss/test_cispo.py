"""CISPO (arXiv:2506.13585 Sec. 3.1): l_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A_t log pi_t.

Per token: value -w A logp with w = clip(r), gradient d l / d logp = -w A (w is a constant).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import TokenMean
from lmpo.methods.loss.cispo import CISPOLoss
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from factories import from_config, make_batch

F64 = torch.float64


def run(loss_fn, lp, old, adv, mask=None):
    lp = torch.as_tensor(lp, dtype=F64)
    B, T = lp.shape
    adv = torch.as_tensor(adv, dtype=F64)
    adv = adv[:, None].expand(B, T).clone() if adv.dim() == 1 else adv
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    old = torch.as_tensor(old, dtype=F64).clone().requires_grad_(True)
    b = make_batch([0.0] * B, None, mask, advantages=adv * mask, old_logprobs=old, dtype=F64)
    lp = lp.clone().requires_grad_(True)
    out = loss_fn(lp, b)
    out.per_token.sum().backward()
    assert old.grad is None or torch.all(old.grad == 0)
    return out.per_token.detach(), lp.grad, out.metrics


def test_hand_case():
    # eps_low 0.2, eps_high 0.28, logp = -1 everywhere, r = [2.0, 1.1, 0.5, pad]  (old = -1 - log r)
    # A = +2: w = [1.28, 1.1, 0.8]: loss = -w * 2 * (-1) = [2.56, 2.2, 1.6]; grad = -w A = [-2.56, -2.2, -1.6]
    # PPO would give the r = 2 token (A > 0, above 1.28) zero gradient; CISPO keeps -2.56.
    r = torch.tensor([[2.0, 1.1, 0.5, 1.0]], dtype=F64)
    lp = torch.full((1, 4), -1.0, dtype=F64)
    loss, grad, m = run(CISPOLoss(epsilon=0.2, epsilon_high=0.28), lp, lp - r.log(), [2.0], [[1, 1, 1, 0]])
    assert_close(loss, torch.tensor([[2.56, 2.2, 1.6, 0.0]], dtype=F64))
    assert_close(grad, torch.tensor([[-2.56, -2.2, -1.6, 0.0]], dtype=F64))
    assert_close(m["loss/clip_frac"], torch.tensor(2 / 3))
    assert_close(m["loss/is_weight_mean"], torch.tensor((1.28 + 1.1 + 0.8) / 3, dtype=F64))
    _, ppo_grad, _ = run(PPOClipLoss(epsilon=0.2, epsilon_high=0.28), lp, lp - r.log(), [2.0], [[1, 1, 1, 0]])
    assert ppo_grad[0, 0].item() == 0.0
    # unified masked form (token_mask): the r = 2, A > 0 token is dropped; r = 0.5 with A > 0 is kept
    loss, grad, _ = run(CISPOLoss(epsilon=0.2, epsilon_high=0.28, token_mask=True), lp, lp - r.log(), [2.0],
                        [[1, 1, 1, 0]])
    assert_close(grad, torch.tensor([[0.0, -2.2, -1.6, 0.0]], dtype=F64))


def test_card_property_no_token_loses_its_gradient():
    # Default (no lower bound, cap 4): every token with A != 0 keeps a nonzero gradient, however far off-policy.
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 6, generator=g, dtype=F64) * 3
    old = lp - torch.randn(4, 6, generator=g, dtype=F64) * 3  # ratios from e^-9 to e^9
    adv = torch.randn(4, 6, generator=g, dtype=F64)
    _, grad, _ = run(CISPOLoss(), lp, old, adv)
    assert torch.all(grad != 0)
    w = (lp - old).exp().clamp(max=4.0)
    assert_close(grad, -w * adv)
    # on-policy it is REINFORCE: gradient -A
    _, grad, _ = run(CISPOLoss(), lp, lp, adv)
    assert_close(grad, -adv)


def test_config_errors():
    with pytest.raises(ConfigError, match="loss.epsilon "):
        from_config(CISPOLoss, epsilon=1.5)
    with pytest.raises(ConfigError, match="loss.epsilon_high"):
        from_config(CISPOLoss, epsilon_high=-0.1)


def loop_cispo(lp, old, adv, mask, eps_low, eps_high, token_mask):
    B, T = len(lp), len(lp[0])
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    lo = 0.0 if eps_low is None else 1 - eps_low
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            r, a = math.exp(lp[i][t] - old[i][t]), adv[i][t]
            if token_mask and ((a > 0 and r > 1 + eps_high) or (a < 0 and r < lo)):
                continue
            w = min(max(r, lo), 1 + eps_high)
            loss[i][t], grad[i][t] = -w * a * lp[i][t], -w * a
    return torch.tensor(loss, dtype=F64), torch.tensor(grad, dtype=F64)


@pytest.mark.parametrize("eps_low, eps_high, token_mask", [(None, 3.0, False), (0.2, 0.28, False), (0.1, 0.5, True)])
def test_matches_loop_reference(eps_low, eps_high, token_mask):
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        lp = -torch.rand(B, T, generator=g, dtype=F64) * 3
        old = lp - torch.randn(B, T, generator=g, dtype=F64) * 0.6
        adv = torch.randn(B, T, generator=g, dtype=F64)
        mask = torch.rand(B, T, generator=g) > 0.25
        adv = adv * mask
        loss, grad, _ = run(CISPOLoss(eps_low, eps_high, token_mask), lp, old, adv, mask)
        ref_loss, ref_grad = loop_cispo(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), eps_low, eps_high,
                                        token_mask)
        assert_close(loss, ref_loss)
        assert_close(grad, ref_grad)


def test_analytic_gradient_through_aggregator():
    # The weight is detached, so the gradient of the token-mean-aggregated loss is -(w A) / N_tokens per token
    # (finite differences would also move the detached weight, so we compare with the analytic gradient instead).
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(3, 5, generator=g) > 0.2
    mask[:, 0] = True
    old = -torch.rand(3, 5, generator=g, dtype=F64)
    b = make_batch([0.0] * 3, None, mask, advantages=torch.randn(3, 5, generator=g, dtype=F64) * mask,
                   old_logprobs=old, dtype=F64)
    agg = TokenMean()
    norm = agg.normaliser(mask, 0)
    lp0 = old + 0.5 * torch.randn(3, 5, generator=g, dtype=F64)
    fn = CISPOLoss(epsilon=0.2, epsilon_high=0.28)
    lp = lp0.clone().requires_grad_(True)
    agg(fn(lp, b).per_token, mask, norm).backward()
    w = (lp0 - old).exp().clamp(0.8, 1.28)
    assert_close(lp.grad, torch.where(mask, -w * b.advantages, torch.zeros_like(w)) / mask.sum())
