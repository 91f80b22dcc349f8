"""GRPO group-relative advantage (arXiv:2402.03300 Sec. 4.1.2), Dr. GRPO (no std) and the batch-std variant."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from factories import from_config, make_batch, random_batch

# Hand case. R = [1, 0, 0.5, 3], groups [0, 0, 0, 1], lengths [3, 2, 1, 3] (T = 3).
#   group 0: R = 1, 0, 0.5 -> mean 0.5, deviations 0.5, -0.5, 0; unbiased var (0.25 + 0.25 + 0)/2 = 0.25 -> std 0.5
#            GRPO A = 0.5/0.5, -0.5/0.5, 0 = 1, -1, 0;  Dr.GRPO A = 0.5, -0.5, 0
#   group 1: singleton R = 3 -> deviation 0, std 0 -> A = 0 / (0 + eps) = 0
#   batch std: mean(R) = 1.125, deviations -0.125, -1.125, -0.625, 1.875, squares sum to 83/16,
#            unbiased var = 83/48 -> A = (group deviation) / sqrt(83/48): 0.5 * sqrt(48/83) = sqrt(12/83)
def hand_batch():
    return make_batch([1.0, 0.0, 0.5, 3.0], [0, 0, 0, 1], [3, 2, 1, 3], T=3)


def per_row_to_tokens(per_row, lengths=(3, 2, 1, 3), T=3):
    return torch.tensor([[v if t < n else 0.0 for t in range(T)] for v, n in zip(per_row, lengths)])


def test_hand_grpo():
    # with eps = 1e-6 the group-0 values are 0.5/(0.5 + 1e-6); the singleton is 0/(0 + 1e-6) = 0
    adv = GRPOAdvantage()(hand_batch())
    r = 0.5 / (0.5 + 1e-6)
    assert_close(adv, per_row_to_tokens([r, -r, 0.0, 0.0]))
    # eps = 0 on group 0 alone: exactly 1, -1, 0
    adv = GRPOAdvantage(eps=0.0)(make_batch([1.0, 0.0, 0.5], [0, 0, 0], [3, 2, 1], T=3))
    assert_close(adv, per_row_to_tokens([1.0, -1.0, 0.0], (3, 2, 1)))


def test_hand_dr_grpo():
    adv = GRPOAdvantage(scale_by_std=False)(hand_batch())
    assert_close(adv, per_row_to_tokens([0.5, -0.5, 0.0, 0.0]))


def test_hand_batch_std():
    adv = GRPOAdvantage(std_level="batch", eps=0.0)(hand_batch())
    a = math.sqrt(12.0 / 83.0)
    assert_close(adv, per_row_to_tokens([a, -a, 0.0, 0.0]))


def test_hand_token_rewards_enter_the_return():
    # R = rewards + sum of token rewards on valid tokens (the 7.0 sits on padding and is ignored):
    #   row 0: 1 + (-0.5 + 0.25) = 0.75;  row 1: 0 + 1.0 = 1.0  -> mean 0.875 -> Dr.GRPO A = [-0.125, 0.125]
    b = make_batch([1.0, 0.0], [4, 4], [[1, 1], [1, 0]], token_rewards=[[-0.5, 0.25], [1.0, 7.0]])
    adv = GRPOAdvantage(scale_by_std=False)(b)
    assert_close(adv, torch.tensor([[-0.125, -0.125], [0.125, 0.0]]))


# --------------------------------------------------------------------------- properties
@pytest.mark.parametrize("seed", range(5))
def test_property_group_sum_zero_unit_std(seed):
    b = random_batch(seed)
    adv = GRPOAdvantage(eps=0.0)(b)[:, 0]  # column 0 is always valid in random_batch
    adv_eps = GRPOAdvantage()(b)[:, 0]
    ids = b.group_ids
    for gid in ids.unique():
        rows = ids == gid
        if rows.sum() == 1:  # singleton: 0/(0 + eps) = 0 (with eps = 0 it would be 0/0)
            assert adv_eps[rows].item() == 0.0
            continue
        a = adv[rows].double()
        assert abs(a.sum().item()) < 1e-5
        assert_close(a.std(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_property_constant_per_row_and_zero_on_padding(seed):
    b = random_batch(seed)
    adv = GRPOAdvantage()(b)
    assert adv.shape == b.response_mask.shape and adv.dtype == torch.float32
    assert torch.all(adv[~b.response_mask] == 0)
    for i in range(b.batch_size):
        valid = adv[i][b.response_mask[i]]
        assert torch.all(valid == valid[0])


@pytest.mark.parametrize("seed", range(3))
def test_property_dr_grpo_is_reward_minus_group_mean(seed):
    b = random_batch(seed)
    adv = GRPOAdvantage(scale_by_std=False)(b)
    g = b.group_ids
    same = (g[:, None] == g[None, :]).float()
    exp = b.rewards - (same @ b.rewards) / same.sum(1)
    assert_close(adv[:, 0], exp)


@pytest.mark.parametrize("seed", range(3))
def test_property_batch_std_unit(seed):
    # dividing the group deviations by the batch std of R: A * std_batch(R) recovers the Dr.GRPO advantage
    b = random_batch(seed)
    a_batch = GRPOAdvantage(std_level="batch", eps=0.0)(b)
    a_dr = GRPOAdvantage(scale_by_std=False)(b)
    assert_close(a_batch * b.rewards.std(), a_dr)


def test_all_equal_group_integer_rewards_give_zero():
    b = make_batch([1.0, 1.0, 1.0, 0.0, 0.0], [0, 0, 0, 1, 1], T=2)
    assert torch.equal(GRPOAdvantage()(b), torch.zeros(5, 2))


@pytest.mark.parametrize("std_level", ["group", "batch"])
def test_all_equal_group_any_value_gives_zero(std_level):
    # regression: 8 x 0.9 used to give A = -0.056 on every row (float32 mean 1 ulp off, std ~1e-8 << eps)
    for value in (0.9, 0.1, 0.3, 0.7):
        for n in (3, 6, 7, 8):
            b = make_batch([value] * n + [0.0, 1.0], [0] * n + [1, 1], T=2)
            adv = GRPOAdvantage(std_level=std_level)(b)
            assert torch.all(adv[:n] == 0), (value, n)


def test_batch_std_single_row_is_zero():
    # regression: std_level="batch" used r.std(), NaN for a single row (Bessel with n = 1); A = 0/(0 + eps) = 0
    b = make_batch([1.0], [0], T=2)
    assert torch.equal(GRPOAdvantage(std_level="batch")(b), torch.zeros(1, 2))


def test_bad_std_level():
    with pytest.raises(ConfigError, match="std_level"):
        from_config(GRPOAdvantage, std_level="prompt")


# --------------------------------------------------------------------------- loop reference
def loop_grpo(b, scale_by_std, std_level, eps):
    R = b.rewards.tolist()
    if b.token_rewards is not None:
        R = [R[i] + sum(b.token_rewards[i, t].item() for t in range(b.response_mask.shape[1]) if b.response_mask[i, t])
             for i in range(len(R))]
    g = b.group_ids.tolist()
    n_all = len(R)
    mean_all = sum(R) / n_all
    batch_std = math.sqrt(sum((r - mean_all) ** 2 for r in R) / (n_all - 1))
    out = []
    for i in range(n_all):
        members = [R[j] for j in range(n_all) if g[j] == g[i]]
        mean = sum(members) / len(members)
        a = R[i] - mean
        if scale_by_std:
            if std_level == "group":
                std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1)) if len(members) > 1 else 0.0
            else:
                std = batch_std
            a = a / (std + eps)
        out.append([a if b.response_mask[i, t] else 0.0 for t in range(b.response_mask.shape[1])])
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("scale_by_std, std_level", [(True, "group"), (False, "group"), (True, "batch")])
def test_matches_loop_reference(scale_by_std, std_level):
    for seed in range(8):
        b = random_batch(seed, token_rewards=seed % 2 == 1)
        if b.batch_size < 2:
            b = random_batch(seed + 100, token_rewards=seed % 2 == 1)
        comp = GRPOAdvantage(scale_by_std=scale_by_std, std_level=std_level)
        assert_close(comp(b), loop_grpo(b, scale_by_std, std_level, comp.eps))


# --------------------------------------------------------------------------- gradient (Jacobian w.r.t. rewards)
def test_jacobian_dr_grpo_analytic():
    # Dr.GRPO A_i = R_i - mean_{g(i)} R  ->  dA_i/dR_j = delta_ij - [g_i == g_j] / n_{g(i)}
    gid = torch.tensor([2, 5, 2, 2, 5, 9])
    mask = torch.ones(6, 1, dtype=torch.bool)

    def f(r):
        return GRPOAdvantage(scale_by_std=False)(make_batch(r, gid, mask))[:, 0]

    J = torch.autograd.functional.jacobian(f, torch.randn(6))
    same = (gid[:, None] == gid[None, :]).float()
    assert_close(J, torch.eye(6) - same / same.sum(1, keepdim=True))


def test_jacobian_grpo_analytic():
    # group of n with mean m, unbiased std s (eps = 0): A_i = (R_i - m)/s,
    #   dA_i/dR_j = (delta_ij - 1/n)/s - (R_i - m)(R_j - m) / ((n - 1) s^3)
    R = torch.tensor([1.0, 0.0, 0.5, 2.0])
    mask = torch.ones(4, 1, dtype=torch.bool)
    J = torch.autograd.functional.jacobian(lambda r: GRPOAdvantage(eps=0.0)(make_batch(r, None, mask))[:, 0], R)
    n, m = 4, R.mean()
    s = R.std()
    d = R - m
    exp = (torch.eye(4) - 1.0 / n) / s - d[:, None] * d[None, :] / ((n - 1) * s**3)
    assert_close(J, exp)


def test_hand_singleton_groups_zero_or_verl_raw():
    # groups [0, 0, 1], rewards [1, 0, 0.7], eps = 0.
    #   pair: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / 0.707107 = +-0.707107
    #   singleton, default: R - mean(R) = 0 (no baseline, no group-relative signal)
    #   singleton, "raw" (verl's compute_grpo_outcome_advantage: mean 0, std 1 for a group of one): 0.7 / 1
    #   Dr. GRPO (no std) "raw": 0.7 - 0 = 0.7
    b = make_batch([1.0, 0.0, 0.7], [0, 0, 1], T=1)
    h = 0.5 / math.sqrt(0.5)
    assert_close(GRPOAdvantage(eps=0.0)(b)[:, 0], torch.tensor([h, -h, 0.0]))
    assert_close(GRPOAdvantage(eps=0.0, singleton="raw")(b)[:, 0], torch.tensor([h, -h, 0.7]))
    assert_close(GRPOAdvantage(eps=0.1, singleton="raw")(b)[2, 0], torch.tensor(0.7 / 1.1))  # verl: / (1 + eps)
    assert_close(GRPOAdvantage(scale_by_std=False, singleton="raw")(b)[:, 0], torch.tensor([0.5, -0.5, 0.7]))
    with pytest.raises(ConfigError, match="advantage.singleton"):
        from_config(GRPOAdvantage, singleton="pass")
