"""REINFORCE++ (arXiv:2501.03262 Eqs. 3-5): reward-to-go whitened over every valid token of the batch."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo import ops
from lmpo.errors import ConfigError
from lmpo.methods.advantage.reinforce_pp import ReinforcePPAdvantage, returns_to_go
from factories import from_config, make_batch, random_batch


def test_hand_outcome_only():
    # R = [1, 0, 2], lengths [2, 1, 1] (T = 2): valid-token returns {1, 1, 0, 2}
    #   mean 1, deviations 0, 0, -1, 1, ss 2, unbiased var 2/3 -> std sqrt(2/3)
    #   A = [[0, 0], [-sqrt(3/2), 0 (pad)], [sqrt(3/2), 0 (pad)]]
    b = make_batch([1.0, 0.0, 2.0], [0, 0, 1], [2, 1, 1], T=2)
    a = math.sqrt(1.5)
    assert_close(ReinforcePPAdvantage()(b), torch.tensor([[0.0, 0.0], [-a, 0.0], [a, 0.0]]))


def test_hand_token_rewards_are_reward_to_go():
    # R = [1, 0]; mask [[1, 1, 1], [1, 1, 0]]; token rewards [[-.1, -.2, -.3], [-.4, -.5, 9 (pad)]]
    #   G_t = R + sum_{s >= t} r_s:
    #   row 0: 1 - 0.6 = 0.4, 1 - 0.5 = 0.5, 1 - 0.3 = 0.7
    #   row 1: 0 - 0.9 = -0.9, 0 - 0.5 = -0.5   (the padded 9 is ignored)
    #   mean (0.4 + 0.5 + 0.7 - 0.9 - 0.5)/5 = 0.04; deviations .36 .46 .66 -.94 -.54
    #   squares .1296 + .2116 + .4356 + .8836 + .2916 = 1.952 -> unbiased var 0.488
    tr = [[-0.1, -0.2, -0.3], [-0.4, -0.5, 9.0]]
    b = make_batch([1.0, 0.0], [0, 0], [[1, 1, 1], [1, 1, 0]], token_rewards=tr)
    assert_close(returns_to_go(b, b.rewards), torch.tensor([[0.4, 0.5, 0.7], [-0.9, -0.5, 0.0]]))
    s = math.sqrt(0.488)
    exp = torch.tensor([[0.36, 0.46, 0.66], [-0.94, -0.54, 0.0]]) / s
    exp[1, 2] = 0.0
    assert_close(ReinforcePPAdvantage()(b), exp)


def test_hand_token_reward_on_a_masked_middle_token_is_ignored():
    # mask [1, 0, 1] (the middle token is tool output): r = [a, 5, c] with 5 masked
    # G = [R + a + c, 0 (masked), R + c]
    b = make_batch([2.0], [0], [[1, 0, 1]], token_rewards=[[0.5, 5.0, -1.0]])
    assert_close(returns_to_go(b, b.rewards), torch.tensor([[1.5, 0.0, 1.0]]))


def test_hand_group_mean_baseline():
    # R = [1, 0, 2, 5], groups [0, 0, 0, 1], T = 1: group means 1, 1, 1, 5 -> [0, -1, 1, 0]
    #   whitened over 4 tokens: mean 0, ss 2, var 2/3 -> A = [0, -sqrt(3/2), sqrt(3/2), 0]
    b = make_batch([1.0, 0.0, 2.0, 5.0], [0, 0, 0, 1], T=1)
    a = math.sqrt(1.5)
    assert_close(ReinforcePPAdvantage(baseline="group_mean")(b), torch.tensor([[0.0], [-a], [a], [0.0]]))


# --------------------------------------------------------------------------- properties
@pytest.mark.parametrize("baseline", ["none", "group_mean"])
def test_property_whitened_over_valid_tokens(baseline):
    for seed in range(5):
        b = random_batch(seed, T=5, token_rewards=True)
        adv = ReinforcePPAdvantage(baseline=baseline)(b)
        m = b.response_mask
        assert torch.all(adv[~m] == 0)
        assert_close(ops.masked_mean(adv, m), torch.tensor(0.0), atol=1e-6, rtol=0)
        assert_close(ops.masked_var(adv, m), torch.tensor(1.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_property_group_mean_baseline_ignores_per_group_offsets(seed):
    # adding c_g to every outcome of group g changes nothing with the group-mean baseline
    b = random_batch(seed, T=4, token_rewards=True)
    shift = (b.group_ids % 7).float() * 3.0
    comp = ReinforcePPAdvantage(baseline="group_mean")
    assert_close(comp(b.replace(rewards=b.rewards + shift)), comp(b), atol=1e-5, rtol=0)


def test_bad_baseline():
    with pytest.raises(ConfigError, match="baseline"):
        from_config(ReinforcePPAdvantage, baseline="loo")


@pytest.mark.parametrize("value", [0.9, 0.1, 0.3])
@pytest.mark.parametrize("baseline", ["none", "group_mean"])
def test_all_equal_returns_give_zero(value, baseline):
    # regression: 8 x 0.9 (no signal) used to give A = +0.84 on every token (float32 whitening of a constant)
    b = make_batch([value] * 8, [0] * 4 + [1] * 4, T=3)
    assert_close(ReinforcePPAdvantage(baseline=baseline)(b), torch.zeros(8, 3), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- loop reference
def loop_reinforce_pp(b, baseline, eps):
    B, T = b.response_mask.shape
    m = b.response_mask.tolist()
    R = b.rewards.tolist()
    if baseline == "group_mean":
        g = b.group_ids.tolist()
        R = [R[i] - sum(R[j] for j in range(B) if g[j] == g[i]) / sum(1 for j in range(B) if g[j] == g[i])
             for i in range(B)]
    G = [[0.0] * T for _ in range(B)]
    for i in range(B):
        acc = 0.0
        for t in reversed(range(T)):
            if m[i][t]:
                if b.token_rewards is not None:
                    acc += b.token_rewards[i, t].item()
                G[i][t] = R[i] + acc
    vals = [G[i][t] for i in range(B) for t in range(T) if m[i][t]]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1))
    return torch.tensor([[(G[i][t] - mean) / (std + eps) if m[i][t] else 0.0 for t in range(T)] for i in range(B)])


@pytest.mark.parametrize("baseline", ["none", "group_mean"])
def test_matches_loop_reference(baseline):
    for seed in range(8):
        b = random_batch(seed, token_rewards=seed % 3 != 0)
        comp = ReinforcePPAdvantage(baseline=baseline)
        assert_close(comp(b), loop_reinforce_pp(b, baseline, comp.eps))


# --------------------------------------------------------------------------- gradient (Jacobian)
def test_returns_to_go_jacobian_analytic():
    # G_t = R + sum_{s >= t, valid} r_s on valid t: dG_t/dr_s = [t valid][s valid][s >= t]; dG_t/dR = [t valid]
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    tr = torch.randn(2, 4)

    def f(tr_, r_):
        b = make_batch(r_, [0, 0], mask, token_rewards=tr_)
        return returns_to_go(b, r_)

    J_tr, J_r = torch.autograd.functional.jacobian(f, (tr, torch.zeros(2)))
    exp_tr = torch.zeros(2, 4, 2, 4)
    exp_r = torch.zeros(2, 4, 2)
    for i in range(2):
        for t in range(4):
            if mask[i, t]:
                exp_r[i, t, i] = 1.0
                for s in range(t, 4):
                    exp_tr[i, t, i, s] = float(mask[i, s])
    assert_close(J_tr, exp_tr)
    assert_close(J_r, exp_r)


# --------------------------------------------------------------------------- discount (gamma) and singletons
def test_hand_discounted_returns():
    # gamma = 0.5, R = [4, 2], mask [[1, 1, 1], [1, 1, 0]], token rewards [[1, 0, 2], [0, 1, 9 (pad)]]
    #   row 0 (last = 2): G_2 = 4 + 2 = 6; G_1 = 0 + 0.5*6 = 3; G_0 = 1 + 0.5*3 = 2.5
    #   row 1 (last = 1): G_1 = 2 + 1 = 3; G_0 = 0 + 0.5*3 = 1.5
    b = make_batch([4.0, 2.0], [0, 0], [[1, 1, 1], [1, 1, 0]], token_rewards=[[1.0, 0.0, 2.0], [0.0, 1.0, 9.0]])
    assert_close(returns_to_go(b, b.rewards, 0.5), torch.tensor([[2.5, 3.0, 6.0], [1.5, 3.0, 0.0]]))
    assert_close(returns_to_go(b, b.rewards, 1.0), returns_to_go(b, b.rewards))


def test_hand_discount_counts_masked_positions():
    # mask [1, 0, 1], gamma 0.5, R = 8, no token rewards: G = [8 * 0.25, 0 (masked), 8]
    b = make_batch([8.0], [0], [[1, 0, 1]])
    assert_close(returns_to_go(b, b.rewards, 0.5), torch.tensor([[2.0, 0.0, 8.0]]))


def test_property_gamma_zero_keeps_only_the_last_token_outcome():
    b = random_batch(3, token_rewards=False, holes=False)
    g = returns_to_go(b, b.rewards, 0.0)
    last = b.response_mask.cumsum(-1) == b.response_mask.sum(-1, keepdim=True)
    last &= b.response_mask
    assert_close(g, torch.where(last, b.rewards[:, None].expand_as(g), torch.zeros_like(g)))


def loop_discounted(b, gamma):
    B, T = b.response_mask.shape
    m = b.response_mask.tolist()
    out = [[0.0] * T for _ in range(B)]
    for i in range(B):
        valid = [t for t in range(T) if m[i][t]]
        if not valid:
            continue
        last = valid[-1]
        for t in valid:
            acc = gamma ** (last - t) * b.rewards[i].item()
            if b.token_rewards is not None:
                acc += sum(gamma ** (s - t) * b.token_rewards[i, s].item() for s in valid if s >= t)
            out[i][t] = acc
    return torch.tensor(out)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 1.0])
def test_discounted_returns_match_loop_reference(gamma):
    for seed in range(6):
        b = random_batch(seed, token_rewards=seed % 2 == 0)
        assert_close(returns_to_go(b, b.rewards, gamma), loop_discounted(b, gamma))


def test_singleton_raw_passes_the_reward_through():
    # groups [0, 0, 1], R = [1, 3, 5], T = 1: zero -> [-1, 1, 0]; raw -> [-1, 1, 5], then whitened
    b = make_batch([1.0, 3.0, 5.0], [0, 0, 1], T=1)
    for singleton, centred in (("zero", [-1.0, 1.0, 0.0]), ("raw", [-1.0, 1.0, 5.0])):
        c = torch.tensor(centred)
        exp = ((c - c.mean()) / (c.std() + 1e-8))[:, None]
        assert_close(ReinforcePPAdvantage(baseline="group_mean", singleton=singleton)(b), exp)


def test_bad_gamma():
    with pytest.raises(ConfigError, match="gamma"):
        from_config(ReinforcePPAdvantage, gamma=1.5)
