"""CAPO curvature mask (arXiv:2510.00819, reconstructed): keep token t iff s_t <= tau * mean(s),
s_t = |c_t| ||h_t||^2 (1 - pi(y_t)), c_t = -A r (0 where clipped); kept tokens get the PPO-clip loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.loss.capo_curvature import CAPOCurvatureLoss
from lmpo.methods.loss.ppo_clip import PPOClipLoss
from unit.methods._helpers import make_batch

F64 = torch.float64


def batch(old, adv, hidden, mask=None):
    old = torch.as_tensor(old, dtype=F64)
    B, T = old.shape
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
    b = make_batch([0.0] * B, None, mask, advantages=torch.as_tensor(adv, dtype=F64) * mask, old_logprobs=old,
                   dtype=F64)
    return b.replace(extras={"hidden": torch.as_tensor(hidden, dtype=F64)})


def test_hand_case():
    # One row, 4 tokens, r = 1 (logp = old), A = 1 -> c = -1. pi = exp(logp) = [0.5, 0.5, 0.5, 0.9].
    # ||h||^2 = [1, 1, 16, 1] -> s = [0.5, 0.5, 8.0, 0.1], mean 2.275; tau = 2 -> bound 4.55: token 2 is rejected.
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.9]], dtype=F64))
    hidden = [[[1.0, 0.0], [0.0, 1.0], [4.0, 0.0], [0.6, 0.8]]]
    b = batch(logp, [[1.0] * 4], hidden)
    lp = logp.clone().requires_grad_(True)
    out = CAPOCurvatureLoss(threshold=2.0)(lp, b)
    assert_close(out.per_token, torch.tensor([[-1.0, -1.0, 0.0, -1.0]], dtype=F64))
    out.per_token.sum().backward()
    assert_close(lp.grad, torch.tensor([[-1.0, -1.0, 0.0, -1.0]], dtype=F64))  # masked token: no gradient
    assert_close(out.metrics["loss/capo_rejected"], torch.tensor(0.25))
    # tau = 4 -> bound 9.1: nothing rejected
    assert CAPOCurvatureLoss(threshold=4.0)(lp, b).metrics["loss/capo_rejected"].item() == 0.0


def test_card_property_infinite_threshold_is_grpo():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=g, dtype=F64) * 2
    b = batch(old, torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, 5, 4, generator=g, dtype=F64) * 3)
    lp = old + 0.3 * torch.randn(3, 5, generator=g, dtype=F64)
    assert_close(CAPOCurvatureLoss(threshold=math.inf)(lp, b).per_token, PPOClipLoss()(lp, b).per_token)
    # without hidden states (outside the trainer) nothing is masked either
    assert_close(CAPOCurvatureLoss(threshold=0.01)(lp, b.replace(extras={})).per_token, PPOClipLoss()(lp, b).per_token)


def loop_capo(lp, old, adv, hidden, mask, tau, eps):
    B, T = len(lp), len(lp[0])
    ppo, score = {}, {}
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            r, a = math.exp(lp[i][t] - old[i][t]), adv[i][t]
            clipped = (a >= 0 and r > 1 + eps) or (a < 0 and r < 1 - eps)
            ppo[i, t] = -a * min(max(r, 1 - eps), 1 + eps) if clipped else -a * r
            c = 0.0 if clipped else -a * r
            score[i, t] = abs(c) * sum(x * x for x in hidden[i][t]) * (1 - math.exp(min(lp[i][t], 0.0)))
    mean = sum(score.values()) / len(score)
    return torch.tensor([[ppo[i, t] if mask[i][t] and score[i, t] <= tau * mean else 0.0 for t in range(T)]
                         for i in range(B)], dtype=F64)


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, H = 4, 5, 3
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    old = -torch.rand(B, T, generator=g, dtype=F64) * 2
    lp = old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, T, generator=g, dtype=F64)
    hidden = torch.randn(B, T, H, generator=g, dtype=F64) * torch.rand(B, T, 1, generator=g, dtype=F64) * 3
    out = CAPOCurvatureLoss(threshold=1.5)(lp, batch(old, adv, hidden, mask)).per_token
    ref = loop_capo(lp.tolist(), old.tolist(), (adv * mask).tolist(), hidden.tolist(), mask.tolist(), 1.5, 0.2)
    assert_close(out, ref)


def test_gradcheck_kept_tokens_are_ppo():
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(2, 4, generator=g, dtype=F64)
    b = batch(old, torch.randn(2, 4, generator=g, dtype=F64), torch.randn(2, 4, 3, generator=g, dtype=F64))
    lp = (old + 0.05 * torch.randn(2, 4, generator=g, dtype=F64)).requires_grad_(True)
    fn = CAPOCurvatureLoss(threshold=1.0)
    assert torch.autograd.gradcheck(lambda x: fn(x, b).per_token.sum(), (lp,))


def test_config_errors():
    with pytest.raises(ConfigError, match="threshold"):
        CAPOCurvatureLoss(threshold=0.0)
    with pytest.raises(ConfigError, match="epsilon"):
        CAPOCurvatureLoss(epsilon=-1.0)
    assert "hidden_states" in CAPOCurvatureLoss.needs
