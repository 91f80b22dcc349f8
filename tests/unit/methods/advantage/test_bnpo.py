"""BNPO (arXiv:2506.02864): A = (R~ - p_q) / Beta_{alpha,beta}(p_q), alpha/beta fitted to the batch's success rates."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.bnpo import BNPOAdvantage
from lmpo.methods.advantage.grpo import GRPOAdvantage
from factories import from_config, make_batch, random_batch


def beta_pdf(p, a, b):
    log_b = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return math.exp((a - 1) * math.log(p) + (b - 1) * math.log(1 - p) - log_b)


# Hand case (card test c): groups [1,0,0,0,0] (p = 0.2) and [1,1,1,1,0] (p = 0.8); rewards already span [0, 1].
#   m = 0.5, unbiased v = ((0.3)^2 + (0.3)^2) / 1 = 0.18 -> c = 0.25/0.18 - 1 = 7/18
#   a = b = c * 0.5 = 7/36 -> alpha = beta = 1 + 7/108
#   row 0: A = (1 - 0.2) / f(0.2);  row 1: (0 - 0.2) / f(0.2);  row 5: (1 - 0.8) / f(0.8);  row 9: (0 - 0.8)/f(0.8)
def test_hand_adaptive_fit():
    R = [1.0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
    g = [0] * 5 + [1] * 5
    adv = BNPOAdvantage()(make_batch(R, g, T=1))[:, 0]
    al = 1 + 7 / 108
    f2, f8 = beta_pdf(0.2, al, al), beta_pdf(0.8, al, al)
    exp = [0.8 / f2] + [-0.2 / f2] * 4 + [0.2 / f8] * 4 + [-0.8 / f8]
    assert_close(adv, torch.tensor(exp))
    assert abs(al - 1.0648) < 1e-4  # "close to REINFORCE scaling"


def test_hand_grpo_special_case():
    # alpha = beta = 3/2: f(p) = (8/pi) sqrt(p(1-p)); group [1,0,0,0]: p = 0.25, sqrt(0.1875) = 0.4330
    #   A_1 = (pi/8) * 0.75 / 0.4330 = 0.3927 * 1.7321 = 0.6802;  A_2..4 = (pi/8) * (-0.25)/0.4330 = -0.2267
    adv = BNPOAdvantage(alpha=1.5, beta=1.5)(make_batch([1.0, 0, 0, 0], [0] * 4, T=1))[:, 0]
    s = math.sqrt(0.1875)
    assert_close(adv, torch.tensor([math.pi / 8 * 0.75 / s] + [-math.pi / 8 * 0.25 / s] * 3))


@pytest.mark.parametrize("seed", range(4))
def test_property_special_cases(seed):
    # binary rewards: alpha = beta = 1 -> Dr.GRPO (mean baseline); alpha = beta = 3/2 -> (pi/8) x GRPO (population std)
    g = torch.Generator().manual_seed(seed)
    R = torch.randint(0, 2, (12,), generator=g).float()
    R[0], R[1] = 0.0, 1.0  # the batch spans [0, 1] so R~ = R
    ids = torch.arange(3).repeat_interleave(4)
    b = make_batch(R, ids, T=2)
    assert_close(BNPOAdvantage(alpha=1.0, beta=1.0)(b), GRPOAdvantage(scale_by_std=False)(b))
    pop_std = torch.stack([R[ids == i].std(unbiased=False) for i in ids])
    grpo_pop = (R - torch.stack([R[ids == i].mean() for i in ids])) / torch.where(pop_std > 0, pop_std, 1.0)
    assert_close(BNPOAdvantage(alpha=1.5, beta=1.5)(b)[:, 0], math.pi / 8 * grpo_pop)


def test_all_equal_group_and_constant_batch_zero():
    b = make_batch([1.0, 1.0, 1.0, 0.0, 0.0, 1.0], [0, 0, 0, 1, 1, 1], T=2)
    adv = BNPOAdvantage()(b)
    assert torch.all(adv[:3] == 0) and torch.isfinite(adv).all()
    assert torch.equal(BNPOAdvantage()(make_batch([0.7] * 4, [0, 0, 1, 1], T=2)), torch.zeros(4, 2))


# Issue 21 example (released code: the reward range is fixed to [0, 1], not the batch's min / max).
# Rewards in {0, 0.5}: groups [0.5, 0, 0, 0] (p = 0.125) and [0.5, 0.5, 0, 0] (p = 0.25); R~ = R.
#   m = 0.1875, unbiased v = 2 * 0.0625^2 = 0.0078125, m (1 - m) = 0.15234375 -> c = 19.5 - 1 = 18.5
#   alpha = 1 + 18.5 * 0.1875 / 3 = 2.15625, beta = 1 + 18.5 * 0.8125 / 3 = 6.0104...
#   row 0: (0.5 - 0.125) / f(0.125), row 1: -0.125 / f(0.125), row 4: 0.25 / f(0.25), row 6: -0.25 / f(0.25)
# (The old batch min/max rescaling doubled R~ and refitted alpha/beta: ~3.5x these advantages.)
def test_hand_issue21_fixed_unit_range():
    R = [0.5, 0, 0, 0, 0.5, 0.5, 0, 0]
    adv = BNPOAdvantage()(make_batch(R, [0] * 4 + [1] * 4, T=1))[:, 0]
    al, be = 2.15625, 1 + 18.5 * 0.8125 / 3
    f1, f2 = beta_pdf(0.125, al, be), beta_pdf(0.25, al, be)
    exp = [0.375 / f1] + [-0.125 / f1] * 3 + [0.25 / f2] * 2 + [-0.25 / f2] * 2
    assert_close(adv, torch.tensor(exp))
    assert 0.15 < adv[0] < 0.152  # 0.1509 (the batch-range rescaling gave 0.5185)


def test_rescaling_and_decomposition():
    # rewards {0, 4} with the declared range [0, 4]: R~ = R / 4, so BNPO(R) = BNPO(R / 4) on [0, 1];
    # decomposition of one component = plain BNPO
    R = torch.tensor([4.0, 0, 0, 4, 4, 4, 0, 0, 0])
    g = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    b4, b1 = make_batch(R, g, T=1), make_batch(R / 4, g, T=1)
    assert_close(BNPOAdvantage(r_min=0.0, r_max=4.0)(b4), BNPOAdvantage()(b1))
    assert_close(BNPOAdvantage(r_min=-1.0, r_max=1.0)(make_batch(R / 2 - 1, g, T=1)), BNPOAdvantage()(b1))
    dec = BNPOAdvantage(decompose=True)
    assert_close(dec(b1.replace(reward_components=(R / 4)[:, None])), BNPOAdvantage()(b1))
    # two components: the mean of the per-component advantages
    c = torch.stack([R / 4, 1 - R / 4], 1)
    b = b1.replace(reward_components=c)
    exp = (BNPOAdvantage()(make_batch(c[:, 0], g, T=1)) + BNPOAdvantage()(make_batch(c[:, 1], g, T=1))) / 2
    assert_close(dec(b), exp)


def test_bad_config():
    with pytest.raises(ConfigError, match="advantage.alpha"):
        from_config(BNPOAdvantage, alpha=0.0)
    with pytest.raises(ConfigError, match="advantage.r_max"):
        from_config(BNPOAdvantage, r_min=1.0, r_max=1.0)


# --------------------------------------------------------------------------- loop reference
def loop_bnpo(R, groups, mask):
    B = len(R)
    lo, hi = 0.0, 1.0  # the released code's fixed reward range
    r = [(x - lo) / (hi - lo) for x in R]
    gids = sorted(set(groups))
    pq = {q: sum(r[i] for i in range(B) if groups[i] == q) / groups.count(q) for q in gids}
    ps = [pq[q] for q in gids]
    al = be = 1.0
    if len(ps) >= 2:
        m = sum(ps) / len(ps)
        v = sum((x - m) ** 2 for x in ps) / (len(ps) - 1)
        if v > 0:
            c = m * (1 - m) / v - 1
            al, be = max(1 + c * m / 3, 1.0), max(1 + c * (1 - m) / 3, 1.0)
    out = []
    for i in range(B):
        p = pq[groups[i]]
        if p in (0.0, 1.0):  # every r in the group equals p (r in [0, 1]), so r - p = 0 whatever 1/f is
            inv = 0.0
        else:
            inv = min(1.0 / beta_pdf(p, al, be), 1e6)
        a = (r[i] - p) * inv
        out.append([a if mask[i][t] else 0.0 for t in range(len(mask[0]))])
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(10))
def test_matches_loop_reference(seed):
    b = random_batch(seed, discrete_rewards=seed % 2 == 0)
    b = b.replace(rewards=torch.sigmoid(b.rewards) if seed % 2 else b.rewards)  # rewards in the fixed range [0, 1]
    got = BNPOAdvantage()(b)
    exp = loop_bnpo(b.rewards.tolist(), b.group_ids.tolist(), b.response_mask.tolist())
    assert_close(got, exp, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- gradient
def test_gradcheck_float64():
    # gradient of A w.r.t. the rewards, through the group means and the fitted alpha/beta
    R = torch.tensor([0.9, 0.1, 0.3, 0.6, 0.8, 0.45, 0.2, 0.0, 1.0], dtype=torch.float64)
    g = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    mask = torch.ones(9, 1, dtype=torch.bool)

    def f(r):
        return BNPOAdvantage()(make_batch(r, g, mask, dtype=torch.float64))[:, 0]

    assert torch.autograd.gradcheck(f, (R.clone().requires_grad_(True),))


def test_jacobian_fixed_beta_analytic():
    # fixed alpha, beta and r in [0, 1] with r_min = 0, r_max = 1: A_i = (r_i - p) / f(p), p = group mean
    #   dA_i/dr_j = (delta_ij - 1/n) / f(p) - (r_i - p) f'(p) / f(p)^2 * (1/n)
    #   with f'(p) / f(p) = (alpha - 1)/p - (beta - 1)/(1 - p)
    al, be = 2.0, 3.0
    R = torch.tensor([0.9, 0.1, 0.3, 0.6], dtype=torch.float64)
    mask = torch.ones(4, 1, dtype=torch.bool)
    comp = BNPOAdvantage(r_min=0.0, r_max=1.0, alpha=al, beta=be)
    J = torch.autograd.functional.jacobian(lambda r: comp(make_batch(r, None, mask, dtype=torch.float64))[:, 0], R)
    n, p = 4, R.mean().item()
    f = beta_pdf(p, al, be)
    dlog = (al - 1) / p - (be - 1) / (1 - p)
    d = R - p
    exp = (torch.eye(4, dtype=torch.float64) - 1.0 / n) / f - d[:, None] * dlog / f / n
    assert_close(J, exp)
