"""GAE (arXiv:1506.02438 Eq. 16) and PPO's clipped value loss: hand-derived numbers, a slow loop reference, the
paper's limits (lambda = 0: TD residual; lambda = 1: Monte-Carlo return minus V), the gradient, verl parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from lmpo import ops
from lmpo.errors import ConfigError
from lmpo.methods.advantage.gae import GAEAdvantage, dense_rewards, gae

from factories import from_config, make_batch, random_batch

PEER = Path(__file__).parents[3] / "data" / "peer" / "verl_ppo.json"


def with_values(batch, values):
    return batch.replace(extras={**batch.extras, "values": torch.as_tensor(values, dtype=torch.float32)})


def hand_batch():
    # row 0: 3 trained tokens + 1 pad; token rewards -0.1, 0, 0 and outcome 1 on the last trained token (t=2).
    # row 1: tokens 0 and 2 trained, token 1 an observation (skipped), token 3 pad; outcome 2 on t=2.
    b = make_batch([1.0, 2.0], mask=[[1, 1, 1, 0], [1, 0, 1, 0]],
                   token_rewards=[[-0.1, 0.0, 0.0, 5.0], [0.0, 3.0, 0.0, 0.0]])
    return with_values(b, [[0.5, 0.2, 0.4, 9.0], [0.3, 9.0, 0.1, 7.0]])


def test_hand_derived():
    # gamma 0.9, lambda 0.5, so gamma*lambda = 0.45; V = 0 after the last trained token.
    # row 0: r = (-0.1, 0, 1)
    #   t=2: delta = 1 - 0.4 = 0.6                       A2 = 0.6
    #   t=1: delta = 0 + 0.9*0.4 - 0.2 = 0.16            A1 = 0.16 + 0.45*0.6 = 0.43
    #   t=0: delta = -0.1 + 0.9*0.2 - 0.5 = -0.42        A0 = -0.42 + 0.45*0.43 = -0.2265
    #   returns A + V = (0.2735, 0.63, 1.0)
    # row 1: the observation token (its reward 3 and value 9) is skipped: t=0's next state is t=2.
    #   t=2: delta = 2 - 0.1 = 1.9                       A2 = 1.9
    #   t=0: delta = 0 + 0.9*0.1 - 0.3 = -0.21           A0 = -0.21 + 0.45*1.9 = 0.645
    #   returns (0.945, 0, 2.0, 0)
    b = hand_batch()
    adv, ret = GAEAdvantage(gamma=0.9, lam=0.5, whiten=False).advantages_returns(b)
    assert_close(adv, torch.tensor([[-0.2265, 0.43, 0.6, 0.0], [0.645, 0.0, 1.9, 0.0]]))
    assert_close(ret, torch.tensor([[0.2735, 0.63, 1.0, 0.0], [0.945, 0.0, 2.0, 0.0]]))
    assert_close(GAEAdvantage(gamma=0.9, lam=0.5, whiten=False).value_targets(b), ret)
    # dense rewards: token rewards on trained tokens, the outcome added on the last trained one
    assert_close(dense_rewards(b), torch.tensor([[-0.1, 0.0, 1.0, 0.0], [0.0, 0.0, 2.0, 0.0]]))


def slow_gae(rewards, values, mask, gamma, lam):
    """Per row, on the trained tokens only (observation tokens and padding removed): the textbook sums
    A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V after the end = 0."""
    B, T = mask.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        idx = [t for t in range(T) if mask[i, t]]
        r = [float(rewards[i, t]) for t in idx]
        v = [float(values[i, t]) for t in idx] + [0.0]
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(idx))]
        for k, t in enumerate(idx):
            adv[i, t] = sum((gamma * lam) ** l * deltas[k + l] for l in range(len(idx) - k))
    return adv


@pytest.mark.parametrize("seed", range(6))
def test_matches_slow_reference(seed):
    b = random_batch(seed, T=7, token_rewards=True, holes=True)
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(b.response_mask.shape, generator=g)
    gamma, lam = float(torch.rand((), generator=g)) * 0.5 + 0.5, float(torch.rand((), generator=g))
    b = with_values(b, values)
    adv, ret = gae(dense_rewards(b), values, b.response_mask, gamma, lam)
    ref = slow_gae(dense_rewards(b), values, b.response_mask, gamma, lam)
    assert_close(adv.double(), ref, atol=1e-5, rtol=1e-5)
    assert_close(ret.double(), ops.zero_outside(ref + values.double(), b.response_mask), atol=1e-5, rtol=1e-5)


def test_lambda_limits():
    # lambda = 0: the one-step TD residual; lambda = 1, gamma = 1: the return-to-go minus V (and returns = the
    # return-to-go whatever V is: the Monte-Carlo target).
    b = random_batch(11, T=6, token_rewards=True, holes=False)
    m = b.response_mask
    values = torch.randn(m.shape, generator=torch.Generator().manual_seed(3)) * m
    r = dense_rewards(b)
    a0, _ = gae(r, values, m, 0.9, 0.0)
    next_v = torch.cat([values[:, 1:], torch.zeros(m.shape[0], 1)], 1) * torch.cat(
        [m[:, 1:], torch.zeros(m.shape[0], 1, dtype=torch.bool)], 1)
    assert_close(a0, ops.zero_outside(r + 0.9 * next_v - values, m))
    a1, ret = gae(r, values, m, 1.0, 1.0)
    rtg = ops.zero_outside(r, m).flip(-1).cumsum(-1).flip(-1)
    assert_close(a1, ops.zero_outside(rtg - values, m), atol=1e-5, rtol=1e-5)
    assert_close(ret, ops.zero_outside(rtg, m), atol=1e-5, rtol=1e-5)


def test_whitened_advantages():
    b = random_batch(4, T=5, token_rewards=True)
    b = with_values(b, torch.randn(b.response_mask.shape, generator=torch.Generator().manual_seed(0)))
    m = b.response_mask
    adv = GAEAdvantage()(b)
    assert abs(float(ops.masked_mean(adv, m))) < 1e-5
    assert abs(float(ops.masked_var(adv, m)) - 1.0) < 1e-4
    assert torch.all(adv[~m] == 0)


def test_values_are_needed_and_ranges_checked():
    assert GAEAdvantage.needs == frozenset({"values"})
    with pytest.raises(ConfigError, match="lam"):
        from_config(GAEAdvantage, lam=1.5)


# --------------------------------------------------------------------------- the clipped value loss
def test_value_loss_hand_derived_and_gradient():
    # clip 0.2. (V, V_old, R):
    #   (1.5, 1.0, 2.0): plain (1.5-2)^2 = 0.25; clipped V -> 1.2, (1.2-2)^2 = 0.64 -> 0.5*0.64 = 0.32, clipped,
    #                    gradient 0 (the clipped branch is constant in V)
    #   (1.1, 1.0, 2.0): inside the clip range: 0.5*0.81 = 0.405, gradient V - R = -0.9
    #   (0.5, 1.0, 2.0): plain 2.25 > clipped (0.8-2)^2 = 1.44 -> 1.125, gradient -1.5
    v = torch.tensor([1.5, 1.1, 0.5], requires_grad=True)
    old, ret = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 2.0])
    loss, clipped = ops.clipped_value_loss(v, old, ret, 0.2)
    assert_close(loss, torch.tensor([0.32, 0.405, 1.125]))
    assert clipped.tolist() == [True, False, False]
    loss.sum().backward()
    assert_close(v.grad, torch.tensor([0.0, -0.9, -1.5]))
    plain, none = ops.clipped_value_loss(v.detach(), old, ret, None)
    assert_close(plain, torch.tensor([0.125, 0.405, 1.125])) and not none.any()


def test_value_loss_gradcheck():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    old, ret = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    v.data = torch.where((v - old).abs().sub(0.3).abs() < 1e-3, v + 0.01, v)  # off the clip kinks
    assert torch.autograd.gradcheck(lambda x: ops.clipped_value_loss(x, old, ret, 0.3)[0], (v,))


def test_explained_variance():
    g = torch.Generator().manual_seed(1)
    ret, m = torch.randn(4, 5, generator=g), torch.ones(4, 5, dtype=torch.bool)
    assert_close(ops.explained_variance(ret, ret, m), torch.tensor(1.0))
    assert_close(ops.explained_variance(torch.full_like(ret, float(ret.mean())), ret, m), torch.tensor(0.0),
                 atol=1e-6, rtol=0)
    assert float(ops.explained_variance(ret, torch.ones_like(ret), m)) == 0.0  # constant returns: 0, not NaN


# --------------------------------------------------------------------------- peer parity (verl, numbers stored)
def test_matches_verl():
    """verl's ``compute_gae_advantage_return`` and ``compute_value_loss`` on the same inputs (computed once by
    tests/data/peer/make_verl_ppo.py with verl 0.9.1). verl whitens with rsqrt(var + 1e-8), lmpo with std + 1e-8:
    equal to ~1e-8. Compared on trained tokens (verl leaves carried values on masked ones; lmpo zeroes them)."""
    d = json.loads(PEER.read_text())
    m = torch.tensor(d["mask"])
    b = make_batch(d["outcome"], mask=m, token_rewards=d["token_rewards"])
    b = with_values(b, d["values"])
    for case in d["gae"]:
        est = GAEAdvantage(gamma=case["gamma"], lam=case["lam"], whiten=True)
        assert_close(est(b)[m], torch.tensor(case["advantages"])[m], atol=1e-5, rtol=1e-5)
        assert_close(est.value_targets(b)[m], torch.tensor(case["returns"])[m], atol=1e-6, rtol=1e-6)
    vpreds, returns, values = torch.tensor(d["vpreds"]), torch.tensor(d["vf_returns"]), torch.tensor(d["values"])
    for case in d["value_loss"]:
        per_token, clipped = ops.clipped_value_loss(vpreds, values, returns, case["cliprange_value"])
        assert_close(ops.masked_mean(per_token, m), torch.tensor(case["vf_loss"]), atol=1e-6, rtol=1e-6)
        assert_close(ops.masked_mean(clipped.float(), m), torch.tensor(case["vf_clipfrac"]))
