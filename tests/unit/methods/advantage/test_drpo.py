"""DRPO (arXiv:2510.04474): gradient coefficients of the decoupled objective J_q as per-sequence advantages."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.drpo import DRPOAdvantage
from factories import from_config, make_batch, random_batch


def batch_with_logprobs(R, groups, lengths, T, lp, dtype=torch.float32):
    b = make_batch(R, groups, lengths, T=T, dtype=dtype)
    lp = torch.as_tensor(lp, dtype=dtype)
    return b.replace(sampler_logprobs=torch.where(b.response_mask, lp, torch.zeros((), dtype=dtype)))


# Hand case (card test 1/2): L_max = 10, one group: correct answers of lengths 2 and 6, wrong of lengths 1 and 1
#   r_len = 1 - L/10 = 0.8, 0.4 -> / lambda (0.1) = 8, 4 -> wbar = softmax = [1/(1 + e^-4), e^-4/(1 + e^-4)]
#                                                                   = [0.98201, 0.01799]  (both >= 0)
#   wrong answers: s = token-mean log-prob = -1 and -3 -> -softmax(s / 10) = -[e^-0.1, e^-0.3]/(e^-0.1 + e^-0.3)
def test_hand_card_example():
    lp = [[-9.0] * 6, [-9.0] * 6, [-1.0] * 6, [-3.0] * 6]
    b = batch_with_logprobs([1.0, 1.0, 0.0, 0.0], None, [2, 6, 1, 1], 6, lp)
    adv = DRPOAdvantage(horizon=10)(b)[:, 0]
    e4, a, c = math.exp(-4), math.exp(-0.1), math.exp(-0.3)
    assert_close(adv, torch.tensor([1 / (1 + e4), e4 / (1 + e4), -a / (a + c), -c / (a + c)]))


def test_property_signs_sums_and_uniform_groups():
    # all-correct and all-wrong groups get 0; mixed groups: correct >= 0, wrong <= 0, each side sums to 1 in |.|
    for seed in range(6):
        b = random_batch(seed, discrete_rewards=True, T=6)
        gen = torch.Generator().manual_seed(seed)
        b = b.replace(sampler_logprobs=-torch.rand(b.response_mask.shape, generator=gen))
        adv = DRPOAdvantage(horizon=6)(b)[:, 0]
        for gid in b.group_ids.unique():
            rows = b.group_ids == gid
            r = b.rewards[rows]
            a = adv[rows]
            if r.min() == r.max():
                assert torch.all(a == 0)
            else:
                assert torch.all(a[r > 0.5] >= 0) and torch.all(a[r <= 0.5] <= 0)
                assert_close(a[r > 0.5].sum(), torch.tensor(1.0))
                assert_close(a[r <= 0.5].sum(), torch.tensor(-1.0))


def test_property_long_correct_never_negative():
    # a correct answer at the full budget (r_len = 0) next to a short one still gets A > 0 (GRPO with a length
    # penalty in the reward could make it negative)
    b = batch_with_logprobs([1.0, 1.0, 0.0], None, [1, 8, 2], 8, torch.full((3, 8), -1.0))
    adv = DRPOAdvantage(horizon=8)(b)[:, 0]
    assert adv[1] > 0 and adv[0] > adv[1]


def test_large_lambda_uniform_positive_weights():
    # lambda -> infinity: uniform weights over correct answers (DisCO-logL)
    b = batch_with_logprobs([1.0, 1.0, 1.0, 0.0], None, [1, 3, 7, 2], 8, torch.full((4, 8), -1.0))
    adv = DRPOAdvantage(horizon=8, lam=1e9)(b)[:, 0]
    assert_close(adv[:3], torch.full((3,), 1 / 3))


def test_bad_config_and_missing_horizon():
    with pytest.raises(ConfigError, match="advantage.tau"):
        from_config(DRPOAdvantage, tau=0.0)
    with pytest.raises(ConfigError, match="advantage.lam"):
        from_config(DRPOAdvantage, lam=-1.0)
    with pytest.raises(ConfigError, match="horizon"):
        DRPOAdvantage()(make_batch([1.0, 0.0], None, T=2))


# --------------------------------------------------------------------------- loop reference
def loop_drpo(R, groups, mask, lp, L_max, tau=10.0, lam=0.1):
    B, T = len(R), len(mask[0])
    L = [sum(mask[i]) for i in range(B)]
    s = [sum(lp[i][t] for t in range(T) if mask[i][t]) / L[i] for i in range(B)]
    out = []
    for i in range(B):
        mem = [j for j in range(B) if groups[j] == groups[i]]
        pos = [j for j in mem if R[j] > 0.5]
        neg = [j for j in mem if R[j] <= 0.5]
        if not pos or not neg:
            a = 0.0
        elif R[i] > 0.5:
            z = sum(math.exp((1 - L[j] / L_max) / lam) for j in pos)
            a = math.exp((1 - L[i] / L_max) / lam) / z
        else:
            z = sum(math.exp(s[j] / tau) for j in neg)
            a = -math.exp(s[i] / tau) / z
        out.append([a if mask[i][t] else 0.0 for t in range(T)])
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(10))
def test_matches_loop_reference(seed):
    b = random_batch(seed, discrete_rewards=True, T=6)
    g = torch.Generator().manual_seed(seed + 7)
    b = b.replace(sampler_logprobs=-3 * torch.rand(b.response_mask.shape, generator=g))
    exp = loop_drpo(b.rewards.tolist(), b.group_ids.tolist(), b.response_mask.tolist(), b.sampler_logprobs.tolist(), 6)
    assert_close(DRPOAdvantage(horizon=6)(b), exp, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- gradient
def test_policy_gradient_equals_gradient_of_objective():
    # d/d lp of  sum_o (1/|o|) sum_t (-A_o lp_{o,t})   (per-sequence token mean of the REINFORCE surrogate)
    # equals d/d lp of  -sum_q J_q(lp), with J_q = sum_{O+} wbar s(o) - tau log sum_{O-} exp(s(o)/tau), at lp = pi_old
    g = torch.Generator().manual_seed(0)
    R = torch.tensor([1.0, 0, 1, 0, 0, 1, 1, 0, 0, 0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    lengths = torch.tensor([3, 5, 2, 4, 1, 5, 3, 2, 4, 4])
    T, L_max, tau, lam = 5, 5, 10.0, 0.1
    lp0 = -2 * torch.rand(10, T, generator=g, dtype=torch.float64)
    b = batch_with_logprobs(R, groups, lengths, T, lp0, dtype=torch.float64)
    mask = b.response_mask
    A = DRPOAdvantage(horizon=L_max, tau=tau, lam=lam)(b)[:, 0]

    lp = b.sampler_logprobs.clone().requires_grad_(True)
    surrogate = ((-A[:, None] * lp) * mask).sum(1) / lengths
    (g_sur,) = torch.autograd.grad(surrogate.sum(), lp)

    lp2 = b.sampler_logprobs.clone().requires_grad_(True)
    s = (lp2 * mask).sum(1) / lengths
    J = 0
    for q in groups.unique():
        rows = groups == q
        pos, neg = rows & (R > 0.5), rows & (R <= 0.5)
        if pos.any() and neg.any():
            wbar = torch.softmax((1 - lengths[pos].double() / L_max) / lam, 0)
            J = J + (wbar * s[pos]).sum() - tau * torch.logsumexp(s[neg] / tau, 0)
    (g_obj,) = torch.autograd.grad(-J, lp2)
    assert_close(g_sur, g_obj)
