"""RiskPO (arXiv:2510.00911): Mixed-VaR advantage over bundle paper scores, with quantile tracking."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.riskpo import RiskPOAdvantage, pairing_rank
from factories import from_config, make_batch, random_batch


def one_question(R, dtype=torch.float32):
    """One question (bundle of 1): paper scores are the rewards themselves."""
    return make_batch(R, [0] * len(R), T=1, dtype=dtype)


# Hand case (card): S = (0, 1, 2, 3, 4), alpha 0.2, beta 0.9, w 1.5, batch quantiles by linear interpolation:
#   q_a = 0.2 * 4 = 0.8 (between 0 and 1), q_b = 0.9 * 4 = 3.6
#   A^R_j = [(S - 0.8)_+ - (S - 3.6)_+ + 0.8 - 3.6] / 0.7 = (-2.8, -2.6, -1.6, -0.6, 0) / 0.7
#         = (-4, -3.7143, -2.2857, -0.8571, 0)
#   A^C_j = -(0.8 - S)_+ / 0.2 = (-4, 0, 0, 0, 0)
#   mixed = (1.5 A^C + A^R) / 2.5 = (-4, -1.4857, -0.9143, -0.3429, 0); sample std of S = sqrt(2.5) = 1.5811
#   -> (-2.5298, -0.9396, -0.5782, -0.2168, 0);  "uniform" credit gives these to the responses
def test_hand_card_example():
    comp = RiskPOAdvantage(quantile_mode="batch", credit="uniform", eps=0.0)
    adv = comp(one_question([0.0, 1, 2, 3, 4]))[:, 0]
    a_r = torch.tensor([-2.8, -2.6, -1.6, -0.6, 0.0]) / 0.7
    a_c = torch.tensor([-4.0, 0, 0, 0, 0])
    exp = (1.5 * a_c + a_r) / 2.5 / math.sqrt(2.5)
    assert_close(adv, exp)
    assert_close(adv, torch.tensor([-2.5298, -0.9396, -0.5782, -0.2168, 0.0]), atol=1e-4, rtol=0)
    # "std" credit divides by the question's reward std (the same sqrt(2.5) here)
    adv_std = RiskPOAdvantage(quantile_mode="batch", eps=0.0)(one_question([0.0, 1, 2, 3, 4]))[:, 0]
    assert_close(adv_std, exp / math.sqrt(2.5))


def test_hand_quantile_tracking_and_state():
    # first call initialises q_a = 0.8, q_b = 3.6 from the batch, then one SGD step:
    #   q_a += 0.1 (0.2 - mean(S <= 0.8) = 0.2) -> 0.8;  q_b += 0.1 (0.9 - mean(S <= 3.6) = 0.8) -> 3.61
    comp = RiskPOAdvantage(credit="uniform", eps=0.0)
    b = one_question([0.0, 1, 2, 3, 4])
    adv = comp(b)[:, 0]
    assert comp.state_dict() == pytest.approx({"qa": 0.8, "qb": 3.61})
    # with q_b = 3.61: A^R = [(S - .8)_+ - (S - 3.61)_+ - 2.81] / 0.7
    S = torch.tensor([0.0, 1, 2, 3, 4])
    a_r = (torch.relu(S - 0.8) - torch.relu(S - 3.61) - 2.81) / 0.7
    a_c = -torch.relu(0.8 - S) / 0.2
    assert_close(adv, (1.5 * a_c + a_r) / 2.5 / math.sqrt(2.5))
    # a resumed copy continues exactly like the original
    other = RiskPOAdvantage(credit="uniform", eps=0.0)
    other.load_state_dict(comp.state_dict())
    assert_close(other(b), comp(b))
    assert comp.state_dict() == pytest.approx({"qa": 0.8, "qb": 3.62})


def test_property_nonpositive_and_best_gets_zero():
    for seed in range(5):
        b = random_batch(seed, discrete_rewards=True)
        adv = RiskPOAdvantage(quantile_mode="batch")(b)
        assert torch.all(adv <= 0)
    adv = RiskPOAdvantage(quantile_mode="batch")(one_question([0.3, 0.9, 0.1, 0.5]))[:, 0]
    assert adv[1] == 0 and torch.all(adv[[0, 2, 3]] < 0)


def test_pairing_rank_properties():
    for seed in range(5):
        b = random_batch(seed)
        gen = torch.Generator().manual_seed(seed)
        b = b.replace(response_ids=torch.randint(0, 50, b.response_ids.shape, generator=gen))
        rank = pairing_rank(b)
        for gid in b.group_ids.unique():
            rows = b.group_ids == gid
            assert sorted(rank[rows].tolist()) == list(range(int(rows.sum())))
        perm = torch.randperm(b.batch_size, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(pairing_rank(b.select(perm)), rank[perm])


def test_bad_config():
    with pytest.raises(ConfigError, match="advantage.alpha"):
        from_config(RiskPOAdvantage, alpha=0.9, beta=0.2)
    with pytest.raises(ConfigError, match="advantage.quantile_mode"):
        from_config(RiskPOAdvantage, quantile_mode="ema")
    with pytest.raises(ConfigError, match="advantage.bundle_size"):
        from_config(RiskPOAdvantage, bundle_size=0)


# --------------------------------------------------------------------------- loop reference
def lin_quantile(xs, level):
    xs = sorted(xs)
    pos = level * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def loop_riskpo(R, groups, ranks, mask, alpha=0.2, beta=0.9, bsize=5, w=1.5, eps=1e-6):
    B = len(R)
    qs = sorted(set(groups))
    bundle_of = {q: k // bsize for k, q in enumerate(qs)}
    S = {}
    for i in range(B):
        key = (bundle_of[groups[i]], ranks[i])
        S[key] = S.get(key, 0.0) + R[i]
    out = []
    for i in range(B):
        b = bundle_of[groups[i]]
        papers = [v for (bb, _), v in S.items() if bb == b]
        qa, qb = lin_quantile(papers, alpha), lin_quantile(papers, beta)
        s = S[(b, ranks[i])]
        a_r = (max(s - qa, 0) - max(s - qb, 0) + qa - qb) / (beta - alpha)
        a_c = -max(qa - s, 0) / alpha
        m = sum(papers) / len(papers)
        sd = math.sqrt(sum((x - m) ** 2 for x in papers) / (len(papers) - 1)) if len(papers) > 1 else 0.0
        a = (w * a_c + a_r) / (w + 1) / (sd + eps)
        mem = [R[j] for j in range(B) if groups[j] == groups[i]]
        mm = sum(mem) / len(mem)
        sq = math.sqrt(sum((x - mm) ** 2 for x in mem) / (len(mem) - 1)) if len(mem) > 1 else 0.0
        a = a / (1.0 if sq < 1e-3 else sq)
        out.append([a if mask[i][t] else 0.0 for t in range(len(mask[0]))])
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(10))
def test_matches_loop_reference(seed):
    b = random_batch(seed, discrete_rewards=seed % 2 == 0)
    g = torch.Generator().manual_seed(seed)
    b = b.replace(response_ids=torch.randint(0, 50, b.response_ids.shape, generator=g))
    bsize = 1 + seed % 3
    got = RiskPOAdvantage(quantile_mode="batch", bundle_size=bsize)(b)
    exp = loop_riskpo(b.rewards.tolist(), b.group_ids.tolist(), pairing_rank(b).tolist(), b.response_mask.tolist(),
                      bsize=bsize)
    assert_close(got, exp, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- gradient
def test_gradcheck_float64():
    # two questions in one bundle, 4 responses each; generic rewards keep S away from the kinks at q_a, q_b
    R = torch.tensor([0.9, 0.1, 0.33, 0.62, 0.8, 0.45, 0.21, 0.05], dtype=torch.float64)
    g = [0, 0, 0, 0, 1, 1, 1, 1]
    mask = torch.ones(8, 1, dtype=torch.bool)
    base = make_batch(R, g, mask, dtype=torch.float64).replace(response_ids=torch.arange(8)[:, None])

    def f(r):
        return RiskPOAdvantage(quantile_mode="batch")(base.replace(rewards=r))[:, 0]

    assert torch.autograd.gradcheck(f, (R.clone().requires_grad_(True),))


def test_jacobian_analytic_top_band():
    # one question, uniform credit, eps = 0, S = R. For a paper strictly between q_a and q_b:
    #   mixed a_j = (S_j - q_b)/(beta - alpha)/(w + 1); A_j = a_j / sd(S)
    # The top paper (S above q_b) has A = 0 identically -> its Jacobian row is 0.
    R = torch.tensor([0.0, 1.0, 2.5, 4.0], dtype=torch.float64)
    comp = RiskPOAdvantage(quantile_mode="batch", credit="uniform", eps=0.0)
    J = torch.autograd.functional.jacobian(lambda r: comp(one_question(r, torch.float64))[:, 0], R)
    assert_close(J[3], torch.zeros(4, dtype=torch.float64))
    # row 2 (S = 2.5; q_a = 0.6, q_b = 2.5 + 0.7 * 1.5 = 3.55): A_2 = (S_2 - q_b) / (0.7 * 2.5 * sd)
    #   q_b = S_(2) + 0.7 (S_(3) - S_(2)) -> dq_b/dS = (0, 0, 0.3, 0.7)
    #   dA_2/dS_j = [ (delta_2j - dq_b/dS_j) / (1.75 sd) ] - A_2 * d_j / ((n - 1) sd^2)
    sd, d = R.std(), R - R.mean()
    a2 = (2.5 - 3.55) / (1.75 * sd)
    dqb = torch.tensor([0.0, 0.0, 0.3, 0.7], dtype=torch.float64)
    exp = (torch.tensor([0.0, 0, 1, 0], dtype=torch.float64) - dqb) / (1.75 * sd) - a2 * d / (3 * sd**2)
    assert_close(J[2], exp)
