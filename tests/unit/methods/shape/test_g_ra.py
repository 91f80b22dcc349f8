"""G-RA (arXiv:2508.10548): R = r^high + 1[r^high >= Delta] * sum_t r^low_t; D-RA adds them unconditionally."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.gigpo import GiGPOAdvantage
from lmpo.methods.shape.g_ra import GatedRewardAccumulation
from factories import episode_batch, from_config, make_batch


def test_card_worked_example():
    # Delta = 1, r^low = [0.1, 0.2]: r^high = 1 -> R = 1.3; r^high = 0 -> R = 0 (D-RA would give 0.3)
    b = episode_batch([[0.1, 0.2], [0.1, 0.2]], rewards=[1.0, 0.0])
    out = GatedRewardAccumulation(threshold=1.0)(b)
    assert out.rewards.tolist() == pytest.approx([1.3, 0.0])
    assert_close(out.extras["turn_rewards"], torch.tensor([[0.1, 0.2], [0.0, 0.0]]))  # r~_t
    d_ra = GatedRewardAccumulation(threshold=1.0, gated=False)(b)
    assert d_ra.rewards.tolist() == pytest.approx([1.3, 0.3])
    assert b.rewards.tolist() == [1.0, 0.0]  # the input batch is not modified


def test_card_limits_and_monotonicity():
    rng = random.Random(0)
    low = [[rng.uniform(0, 0.5) for _ in range(rng.randint(1, 3))] for _ in range(8)]
    high = [rng.choice([0.0, 0.5, 1.0, 2.0]) for _ in range(8)]
    b = episode_batch(low, rewards=high, max_turns=4)
    # Delta = -inf is D-RA; Delta = +inf is the outcome alone
    assert_close(GatedRewardAccumulation(threshold=-math.inf)(b).rewards,
                 GatedRewardAccumulation(gated=False)(b).rewards)
    assert_close(GatedRewardAccumulation(threshold=math.inf)(b).rewards, b.rewards)
    # R is non-decreasing in r^high for fixed r^low >= 0
    fn = GatedRewardAccumulation(threshold=1.0)
    for i in range(8):
        Rs = [float(fn(episode_batch([low[i]], rewards=[h])).rewards[0]) for h in (0.0, 0.5, 0.99, 1.0, 1.5, 3.0)]
        assert all(a <= b_ + 1e-12 for a, b_ in zip(Rs, Rs[1:])), Rs


def test_matches_loop_reference_and_ignores_turns_not_played():
    rng = random.Random(3)
    low = [[rng.uniform(-0.2, 0.5) for _ in range(rng.randint(1, 4))] for _ in range(10)]
    high = [rng.choice([0.0, 1.0, 0.7]) for _ in range(10)]
    b = episode_batch(low, rewards=high, max_turns=4)
    # garbage beyond each episode's last turn must not count
    tr = b.extras["turn_rewards"].clone()
    for i, r in enumerate(low):
        tr[i, len(r):] = 9.0
    b = b.replace(extras={**b.extras, "turn_rewards": tr})
    out = GatedRewardAccumulation(threshold=0.7, immediate_weight=0.5)(b)
    want = [h + (0.5 * sum(r) if h >= 0.7 else 0.0) for h, r in zip(high, low)]
    assert out.rewards.tolist() == pytest.approx(want, abs=1e-6)


def test_gated_turn_rewards_reach_turn_level_advantages():
    # Two episodes of one group see the same states and both earn the immediate reward 0.5 at their first turn;
    # only the first succeeds (r^high = 1 vs 0). G-RA: R_G = [1.5, 0], r~ = [[0.5, 0], [0, 0]]; GiGPO (gamma = 1,
    # F = 1): A^E = +-0.75 and, at the shared first state, step returns 0.5 vs 0 -> A^S = +-0.25 (the failed
    # episode's farmed reward is gone). D-RA: both first turns keep 0.5, equal step returns -> A^S = 0.
    b = episode_batch([[0.5, 0.0], [0.5, 0.0]], rewards=[1.0, 0.0], obs_keys=[[1, 2], [1, 2]])
    gated = GatedRewardAccumulation(threshold=1.0)(b)
    adv = GiGPOAdvantage(gamma=1.0, step_weight=1.0)
    a_e, a_s = adv.components(gated)
    assert a_e.tolist() == pytest.approx([0.75, -0.75])  # R_G = [1.5, 0.0]
    assert a_s[:, 0].tolist() == pytest.approx([0.25, -0.25])  # step returns 0.5 vs 0 at the shared first state
    _, a_s_direct = adv.components(GatedRewardAccumulation(gated=False)(b))
    assert a_s_direct[:, 0].tolist() == pytest.approx([0.0, 0.0])  # D-RA: both farmed the same immediate reward


def test_single_turn_batches_pass_through_and_config_errors():
    b = make_batch([1.0, 0.0], [0, 0], [2, 1])
    assert GatedRewardAccumulation()(b) is b
    with pytest.raises(ConfigError, match="immediate_weight"):
        from_config(GatedRewardAccumulation, immediate_weight=-1.0)
    assert torch.equal(GatedRewardAccumulation()(episode_batch([[1.0]], rewards=[1.0])).rewards, torch.tensor([2.0]))
