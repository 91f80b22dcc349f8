"""GDPO (arXiv:2601.05242): per-reward group z-scores, summed, then batch-normalised."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.gdpo import GDPOAdvantage
from lmpo.methods.advantage.grpo import GRPOAdvantage
from factories import from_config, make_batch, random_batch


def with_components(comps, groups, T=1, dtype=torch.float32, mask=None):
    comps = torch.as_tensor(comps, dtype=dtype)
    b = make_batch(comps.sum(1), groups, mask, T=T, dtype=dtype)
    return b.replace(reward_components=comps)


# Hand case (the card's worked example, unbiased std, eps = 0):
#   group A (r1, r2) = (1,1), (0,0), (0,0); group B = (1,0), (0,0), (0,0)
#   per-reward z-score of [1, 0, 0]: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2)/2) = sqrt(1/3)
#       -> [ (2/3)/sqrt(1/3), -(1/3)/sqrt(1/3), ... ] = [2/sqrt(3), -1/sqrt(3), -1/sqrt(3)]
#   group A: both rewards are [1, 0, 0] -> A_sum = [4, -2, -2]/sqrt(3); group B: r2 constant -> A_2 = 0,
#       A_sum = [2, -1, -1]/sqrt(3)
#   batch: mean 0, sum of squares (16 + 4 + 4 + 4 + 1 + 1)/3 = 10 -> unbiased var 10/5 = 2 -> std sqrt(2)
#   A = [4, -2, -2, 2, -1, -1] / sqrt(6)
HAND = [[1, 1], [0, 0], [0, 0], [1, 0], [0, 0], [0, 0]]
GROUPS = [0, 0, 0, 1, 1, 1]


def test_hand_card_example():
    adv = GDPOAdvantage(eps=0.0)(with_components(HAND, GROUPS))[:, 0]
    assert_close(adv, torch.tensor([4.0, -2, -2, 2, -1, -1]) / math.sqrt(6))


def test_property_no_advantage_collapse():
    # GRPO on the summed rewards [2, 0, 0] and [1, 0, 0] gives both groups the same advantages; GDPO does not.
    b = with_components(HAND, GROUPS)
    grpo = GRPOAdvantage(eps=0.0)(b)[:, 0]
    assert_close(grpo[:3], grpo[3:])
    gdpo = GDPOAdvantage(eps=0.0)(b)[:, 0]
    assert_close(gdpo[:3], 2 * gdpo[3:])


def test_hand_weights_and_no_batch_norm():
    # w = (1, 3), no batch normalisation: group A A_sum = 4 * [2, -1, -1]/sqrt(3); group B = [2, -1, -1]/sqrt(3)
    adv = GDPOAdvantage(weights=[1.0, 3.0], batch_norm=False, eps=0.0)(with_components(HAND, GROUPS))[:, 0]
    assert_close(adv, torch.tensor([8.0, -4, -4, 2, -1, -1]) / math.sqrt(3))


@pytest.mark.parametrize("seed", range(4))
def test_property_k1_single_group_is_affine_grpo(seed):
    # K = 1, one group: GDPO = batch z-score of the GRPO advantage; GRPO's has mean 0 and std 1 already (eps = 0)
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(6, generator=g)
    b = with_components(r[:, None], [5] * 6)
    assert_close(GDPOAdvantage(eps=0.0)(b), GRPOAdvantage(eps=0.0)(b), atol=1e-5, rtol=1e-5)


def test_falls_back_to_scalar_reward():
    b = make_batch([1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1], T=2)
    a = GDPOAdvantage(eps=0.0, batch_norm=False)(b)
    assert_close(a, GRPOAdvantage(eps=0.0)(b))


def test_all_equal_rewards_zero():
    b = with_components([[0.9, 1.0]] * 4 + [[0.1, 0.0]] * 3, [0] * 4 + [1] * 3, T=2)
    assert torch.equal(GDPOAdvantage()(b), torch.zeros(7, 2))


def test_bad_config():
    with pytest.raises(ConfigError, match="advantage.eps"):
        from_config(GDPOAdvantage, eps=-1.0)
    with pytest.raises(ConfigError, match="advantage.weights"):
        from_config(GDPOAdvantage, weights=[])
    with pytest.raises(ConfigError, match="advantage.weights"):
        GDPOAdvantage(weights=[1.0])(with_components(HAND, GROUPS))


# --------------------------------------------------------------------------- loop reference
def loop_gdpo(comps, groups, mask, weights, eps):
    B, K = len(comps), len(comps[0])
    a_sum = [0.0] * B
    for k in range(K):
        for i in range(B):
            members = [comps[j][k] for j in range(B) if groups[j] == groups[i]]
            m = sum(members) / len(members)
            s = math.sqrt(sum((x - m) ** 2 for x in members) / (len(members) - 1)) if len(members) > 1 else 0.0
            a_sum[i] += weights[k] * (comps[i][k] - m) / (s + eps)
    rows = [i for i in range(B) if any(mask[i])]  # the batch stage whitens rows with trainable tokens only
    m = sum(a_sum[i] for i in rows) / len(rows)
    s = math.sqrt(sum((a_sum[i] - m) ** 2 for i in rows) / (len(rows) - 1)) if len(rows) > 1 else 0.0
    adv = [(x - m) / (s + eps) for x in a_sum]
    return torch.tensor([[adv[i] if mask[i][t] else 0.0 for t in range(len(mask[0]))] for i in range(B)])


@pytest.mark.parametrize("seed", range(8))
def test_matches_loop_reference(seed):
    b = random_batch(seed)
    g = torch.Generator().manual_seed(seed + 50)
    K = 1 + seed % 3
    comps = torch.randint(0, 3, (b.batch_size, K), generator=g).float() / 2
    b = b.replace(reward_components=comps)
    w = [1.0, 0.5, 2.0][:K]
    got = GDPOAdvantage(weights=w)(b)
    exp = loop_gdpo(comps.tolist(), b.group_ids.tolist(), b.response_mask.tolist(), w, 1e-4)
    assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_hand_issue21_whiten_trained_rows_only_eps_1e4():
    # Released code: the batch whitening uses the rows with trainable tokens only, eps = 1e-4 on every std.
    # K = 1; group 0 = [1, 0], group 1 = [1, 0, 0] whose last row was masked out (no trainable token).
    #   group z-scores (unbiased std + 1e-4): g0 std sqrt(1/2): +-0.5 / (0.707107 + 1e-4)
    #                                        g1 mean 1/3, std sqrt((4/9 + 1/9 + 1/9) / 2) = sqrt(1/3)
    #   batch stage over rows 0..3 only (row 4 still has its group score but no say in mean / std)
    eps = 1e-4
    s0, s1 = math.sqrt(0.5), math.sqrt(1 / 3)
    a = [0.5 / (s0 + eps), -0.5 / (s0 + eps), (2 / 3) / (s1 + eps), (-1 / 3) / (s1 + eps), (-1 / 3) / (s1 + eps)]
    m = sum(a[:4]) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in a[:4]) / 3)
    exp = [(x - m) / (sd + eps) for x in a[:4]] + [0.0]
    b = make_batch([1.0, 0.0, 1.0, 0.0, 0.0], [0, 0, 1, 1, 1], [[1, 1], [1, 0], [1, 1], [1, 1], [0, 0]])
    got = GDPOAdvantage()(b)
    assert_close(got[:, 0], torch.tensor(exp), atol=1e-6, rtol=1e-6)
    assert abs(sum(got[:4, 0].tolist())) < 1e-5  # zero mean over the trained rows


def test_token_rewards_are_an_extra_column():
    # one component [1, 0] plus token rewards summing to [0, 2] on valid tokens: two columns, each z-scored in the
    # single group of 2: [1/sqrt(2), -1/sqrt(2)] and [-1/sqrt(2), 1/sqrt(2)] (unbiased std of a pair |a-b|/sqrt 2)
    # -> A_sum = [0, 0]
    b = make_batch([1.0, 0.0], [0, 0], [[1, 1], [1, 1]], token_rewards=[[0.0, 0.0], [1.0, 1.0]])
    b = b.replace(reward_components=torch.tensor([[1.0], [0.0]]))
    assert_close(GDPOAdvantage(eps=0.0, batch_norm=False)(b), torch.zeros(2, 2))


# --------------------------------------------------------------------------- gradient
def test_gradcheck_float64():
    mask = torch.ones(6, 1, dtype=torch.bool)
    base = torch.tensor(HAND, dtype=torch.float64) + 0.1 * torch.randn(6, 2, dtype=torch.float64,
                                                                        generator=torch.Generator().manual_seed(0))

    def f(c):
        b = make_batch(c.sum(1), GROUPS, mask, dtype=torch.float64).replace(reward_components=c)
        return GDPOAdvantage(eps=0.0)(b)[:, 0]

    assert torch.autograd.gradcheck(f, (base.requires_grad_(True),))


def test_jacobian_analytic_no_batch_norm():
    # without batch norm, dA_i/dr_{jk} = w_k * J_grpo(col k)_{ij}, with the GRPO Jacobian
    #   (delta_ij - 1/n)/s - d_i d_j / ((n - 1) s^3) within the group (0 across groups)
    c = torch.tensor([[1.0, 0.2], [0.0, 0.7], [0.5, 0.1], [2.0, 0.0]])
    groups = [0, 0, 0, 0]
    w = [1.0, 2.0]
    mask = torch.ones(4, 1, dtype=torch.bool)

    def f(x):
        return GDPOAdvantage(weights=w, batch_norm=False, eps=0.0)(
            make_batch(x.sum(1), groups, mask).replace(reward_components=x))[:, 0]

    J = torch.autograd.functional.jacobian(f, c)  # (4, 4, 2)
    for k in range(2):
        col = c[:, k]
        n, s, d = 4, col.std(), col - col.mean()
        exp = (torch.eye(4) - 1.0 / n) / s - d[:, None] * d[None, :] / ((n - 1) * s**3)
        assert_close(J[:, :, k], w[k] * exp)
