"""ROVER (arXiv:2509.24981): l_t = (rho (lp_t - old_t) - sg(A_t + c * rho * [vm_{t+1} - ovm_{t+1}]))^2, where
vm_s = mean_a log pi(a|s) over the vocabulary; the last trained token of a row has target A."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.loss.rover import RoverLoss
from factories import from_config, make_batch, random_mask

F64 = torch.float64


def batch_with(adv, old, mask, vm=None, ovm=None):
    b = make_batch([0.0] * len(adv), None, mask, advantages=adv, old_logprobs=old, dtype=F64)
    if vm is not None:
        b = b.replace(extras={"vocab_mean_logprobs": torch.as_tensor(vm, dtype=F64),
                              "old_vocab_mean_logprobs": torch.as_tensor(ovm, dtype=F64)})
    return b


def test_card_worked_example():
    # Card (b): 3-token vocabulary, logits at s_{t+1}: new [1, 0, -1], old [0, 0, 0].
    #   mean log-softmax new = mean([1,0,-1]) - logsumexp([1,0,-1]) = 0 - log(e + 1 + 1/e) = -1.40761
    #   old = 0 - log 3 = -1.09861; next_q = rho * (-0.30900); with A = 1 the target of token 0 is 0.69100.
    new = torch.tensor([1.0, 0.0, -1.0], dtype=F64)
    vm1 = float(new.mean() - torch.logsumexp(new, 0))
    assert vm1 == pytest.approx(-1.40761, abs=1e-5)
    # One row, two tokens: lp = [-0.5, -1.0], old = [-0.7, -1.1] -> Q = [0.2, 0.1]
    #   token 0: (0.2 - 0.69100)^2 = 0.241081;  token 1 (last, target A = 1): (0.1 - 1)^2 = 0.81
    #   d l_0/d lp_0 = 2 (0.2 - 0.691) = -0.98200;  d l_1/d lp_1 = 2 (0.1 - 1) = -1.8
    b = batch_with([[1.0, 1.0]], [[-0.7, -1.1]], [[1, 1]], vm=[[0.0, vm1]], ovm=[[0.0, -math.log(3)]])
    lp = torch.tensor([[-0.5, -1.0]], dtype=F64, requires_grad=True)
    out = RoverLoss()(lp, b)
    target0 = 1.0 + (vm1 + math.log(3))
    assert target0 == pytest.approx(0.69100, abs=1e-5)
    assert_close(out.per_token.detach(), torch.tensor([[(0.2 - target0) ** 2, 0.81]], dtype=F64))
    out.per_token.sum().backward()
    assert_close(lp.grad, torch.tensor([[2 * (0.2 - target0), -1.8]], dtype=F64))


def test_rho_scales_q_and_next_term():
    # rho = 2, c = 0.5: Q = 2 * 0.2 = 0.4, target0 = 1 + 0.5 * 2 * (-0.3) = 0.7 -> l0 = 0.09; last: (2*0.1 - 1)^2 = 0.64
    b = batch_with([[1.0, 1.0]], [[-0.7, -1.1]], [[1, 1]], vm=[[0.0, -1.4]], ovm=[[0.0, -1.1]])
    lp = torch.tensor([[-0.5, -1.0]], dtype=F64)
    out = RoverLoss(rho=2.0, next_q_scale=0.5)(lp, b)
    assert_close(out.per_token, torch.tensor([[0.09, 0.64]], dtype=F64))


def test_property_reinforce_at_theta_old():
    # Card (a): next term off, at theta = theta_old the gradient is -2 rho A (a REINFORCE / GRPO direction).
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(3, 4, generator=g, dtype=F64)
    old = -torch.rand(3, 4, generator=g, dtype=F64)
    b = batch_with(adv, old, [[1] * 4] * 3)
    lp = old.clone().requires_grad_(True)
    RoverLoss(rho=1.5, next_q_scale=0.0)(lp, b).per_token.sum().backward()
    assert_close(lp.grad, -2 * 1.5 * adv)


def reference(lp, old, adv, vm, ovm, mask, rho, c):
    B, T = lp.shape
    out = torch.zeros(B, T, dtype=lp.dtype)
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            y = float(adv[i, t])
            if t + 1 < T and mask[i, t + 1]:
                y += c * rho * float(vm[i, t + 1] - ovm[i, t + 1])
            out[i, t] = (rho * (lp[i, t] - old[i, t]) - y) ** 2
    return out


@pytest.mark.parametrize("seed", range(5))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 6
    mask = random_mask(g, B, T, holes=False)
    r = lambda: torch.randn(B, T, generator=g, dtype=F64)  # noqa: E731
    lp, old, adv, vm, ovm = r(), r(), r() * mask, r() - 3, r() - 3
    rho, c = 0.7, 0.9
    out = RoverLoss(rho=rho, next_q_scale=c)(lp, batch_with(adv, old, mask, vm, ovm)).per_token
    assert_close(out, reference(lp, old, adv, vm, ovm, mask, rho, c))


def test_gradcheck_and_stop_gradient_into_target():
    g = torch.Generator().manual_seed(3)
    B, T = 3, 4
    mask = random_mask(g, B, T, holes=False)
    adv = torch.randn(B, T, generator=g, dtype=F64) * mask
    old = -torch.rand(B, T, generator=g, dtype=F64)
    vm = (-torch.rand(B, T, generator=g, dtype=F64) - 2).requires_grad_(True)
    ovm = -torch.rand(B, T, generator=g, dtype=F64) - 2
    lp0 = -torch.rand(B, T, generator=g, dtype=F64)
    fn = RoverLoss(rho=1.3)
    torch.autograd.gradcheck(lambda lp: fn(lp, batch_with(adv, old, mask, vm, ovm)).per_token, (lp0.requires_grad_(),))
    fn(lp0, batch_with(adv, old, mask, vm, ovm)).per_token.sum().backward()
    assert vm.grad is None  # the next-state value is a stop-gradient target


def test_without_statistics_target_is_advantage():
    b = batch_with([[0.5, -1.0]], [[-1.0, -1.0]], [[1, 1]])
    out = RoverLoss()(torch.tensor([[-0.8, -1.2]], dtype=F64), b)
    assert_close(out.per_token, torch.tensor([[(0.2 - 0.5) ** 2, (-0.2 + 1.0) ** 2]], dtype=F64))


@pytest.mark.parametrize("kw", [{"rho": 0.0}, {"rho": -1.0}, {"next_q_scale": -0.1}])
def test_validation(kw):
    with pytest.raises(ConfigError, match="loss\\."):
        from_config(RoverLoss, **kw)
