"""FiberPO (arXiv:2603.08239, reconstructed).

b = mean_t l_t, u_t = l_t - b, s = e^b, v_t = e^u_t; g_t = min(v A, clip_f(v) A); l_t = -min(s g_t, clip_b(s) g_t).
Inside both regions l_t = -r_t A and d l_t / d logp_t = -r_t A (cross-token terms of b cancel: d(b + u_t) = d l_t).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.aggregate import SeqMeanTokenMean
from lmpo.methods.loss.fiberpo import FiberPOLoss
from factories import from_config, make_batch, run_token_loss

F64 = torch.float64


run = run_token_loss


def test_hand_two_token_response():
    # l = [log 1.5, 0] -> b = log(1.5)/2, s = sqrt(1.5) = 1.224745; u = [+b, -b], v = [1.224745, 0.816497].
    # A = +1, base eps 0.1, fibre eps 0.2:
    #  fibre: g = [min(1.2247, 1.2), min(0.8165, 0.8165)] = [1.2, 0.816497] (token 0 residual gated)
    #  base:  s~ = 1.1 -> J = min(s g, 1.1 g) = 1.1 g = [1.32, 0.898146]  -> loss = -J
    #  gradient: both s and v_0 are gated (constants), only v_1 moves: dv_1/dlogp = v_1 * (d l_1 - d b)
    #   d v_1 / d logp_0 = -v_1/2, d v_1 / d logp_1 = +v_1/2 -> grad = -1.1 * [-v_1/2, v_1/2]
    fn = FiberPOLoss(base_epsilon=0.1, base_epsilon_high=0.1, fiber_epsilon=0.2, fiber_epsilon_high=0.2)
    loss, grad, m = run(fn, [[math.log(1.5), 0.0]], [1.0])
    v1 = 1 / math.sqrt(1.5)
    assert_close(loss, torch.tensor([[-1.32, -1.1 * v1]], dtype=F64))
    assert_close(grad, torch.tensor([[1.1 * v1 / 2, -1.1 * v1 / 2]], dtype=F64))
    assert m["loss/base_gate_frac"].item() == 1.0 and m["loss/fiber_gate_frac"].item() == 0.5


def test_card_decomposition_and_on_policy_identity():
    g = torch.Generator().manual_seed(0)
    logr = torch.randn(3, 5, generator=g, dtype=F64) * 0.01  # inside both regions with wide gates
    adv = torch.randn(3, 5, generator=g, dtype=F64)
    wide = FiberPOLoss(base_epsilon=0.5, base_epsilon_high=0.5)
    loss, grad, _ = run(wide, logr, adv)
    assert_close(loss, -adv * logr.exp())  # s v = r (b + u = l)
    assert_close(grad, -adv * logr.exp())  # plain IS policy gradient, no cross-token terms
    loss, grad, _ = run(FiberPOLoss(), torch.zeros(3, 5, dtype=F64), adv)  # on-policy: gates inactive
    assert_close(loss, -adv)
    assert_close(grad, -adv)


def test_card_limits_reduce_to_single_level_gates():
    g = torch.Generator().manual_seed(1)
    logr = torch.randn(2, 4, generator=g, dtype=F64) * 0.5
    adv = torch.randn(2, 4, generator=g, dtype=F64)
    b = logr.mean(-1, keepdim=True)
    s, v = b.exp(), (logr - b).exp()
    # eps_f -> inf: -min(s v A, clip(s) v A) (a sequence-level gate on the aggregate)
    loss, _, _ = run(FiberPOLoss(0.1, 0.1, 0.99, 1e9), logr, adv)
    assert_close(loss, torch.maximum(-s * v * adv, -s.clamp(0.9, 1.1) * v * adv))
    # eps_b -> inf: s * (-min(v A, clip(v) A)) (a token gate on the residuals)
    loss, _, _ = run(FiberPOLoss(0.99, 1e9, 0.2, 0.2), logr, adv)
    assert_close(loss, s * torch.maximum(-v * adv, -v.clamp(0.8, 1.2) * adv))


def test_config_errors():
    for kw, key in [({"base_epsilon": 1.0}, "loss.base_epsilon"), ({"fiber_epsilon_high": -1.0},
                                                                   "loss.fiber_epsilon_high")]:
        with pytest.raises(ConfigError, match=key):
            from_config(FiberPOLoss, **kw)


def loop_fiberpo(logr, adv, mask, eb, ebh, ef, efh):
    B, T = len(logr), len(logr[0])
    loss = [[0.0] * T for _ in range(B)]
    for i in range(B):
        idx = [t for t in range(T) if mask[i][t]]
        if not idx:
            continue
        base = sum(logr[i][t] for t in idx) / len(idx)
        s = math.exp(base)
        for t in idx:
            v, a = math.exp(logr[i][t] - base), adv[i][t]
            g = min(v * a, min(max(v, 1 - ef), 1 + efh) * a)
            loss[i][t] = -min(s * g, min(max(s, 1 - eb), 1 + ebh) * g)
    return torch.tensor(loss, dtype=F64)


@pytest.mark.parametrize("eps", [(3e-4, 4e-4, 0.2, 0.2), (0.1, 0.2, 0.1, 0.3)])
def test_matches_loop_reference(eps):
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        B, T = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        logr = torch.randn(B, T, generator=g, dtype=F64) * 0.4
        adv = torch.randn(B, T, generator=g, dtype=F64)
        mask = torch.rand(B, T, generator=g) > 0.25
        loss, _, _ = run(FiberPOLoss(*eps), logr, adv, mask)
        assert_close(loss, loop_fiberpo(logr.tolist(), (adv * mask).tolist(), mask.tolist(), *eps))


@pytest.mark.parametrize("seed", range(4))
def test_gradcheck_through_aggregator(seed):
    # No stop-gradient tricks: the autograd gradient (cross-token through b) must match finite differences.
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(3, 5, generator=g) > 0.2
    mask[:, 0] = True
    old = -torch.rand(3, 5, generator=g, dtype=F64)
    b = make_batch([0.0] * 3, None, mask, advantages=torch.randn(3, 5, generator=g, dtype=F64) * mask,
                   old_logprobs=old, dtype=F64)
    agg = SeqMeanTokenMean()
    norm = agg.normaliser(mask, 0)
    lp = (old + 0.3 * torch.randn(3, 5, generator=g, dtype=F64)).requires_grad_(True)
    fn = FiberPOLoss(0.05, 0.05, 0.2, 0.2)
    assert torch.autograd.gradcheck(lambda x: agg(fn(x, b).per_token, mask, norm), (lp,))
