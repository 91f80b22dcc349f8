"""DAPO (arXiv:2503.14476): dynamic sampling (Sec. 3.2, Eq. 11), soft overlong punishment (Eq. 13), overlong
filtering (Sec. 3.4).

Eq. 13 with L_max = horizon, L_cache = cache_length, start = L_max - L_cache:
  R_length(|y|) = 0 if |y| <= start;  (start - |y|)/L_cache if start < |y| <= L_max;  -1 if |y| > L_max (truncated)
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.select.dapo import DynamicSampling, OverlongMask, OverlongPenalty
from factories import make_batch, random_groups

F64 = torch.float64


# =========================================================================== dynamic sampling
def test_dynamic_sampling_hand():
    # groups: 3 -> rewards {1, 1, 0, 1} mixed -> keep; 8 -> {0, 0} all equal -> drop; 1 -> {0.5} singleton -> drop
    b = make_batch([1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.0], [3, 8, 3, 3, 3, 1, 8], T=2)
    assert DynamicSampling()(b).tolist() == [True, False, True, True, True, False, False]


def test_dynamic_sampling_min_std_is_strict_and_biased():
    # {0, 1}: population std = 0.5 exactly (the biased estimator; the unbiased one would be 0.707)
    b = make_batch([0.0, 1.0], [0, 0], T=1)
    assert DynamicSampling(min_std=0.4)(b).tolist() == [True, True]
    assert DynamicSampling(min_std=0.5)(b).tolist() == [False, False]
    assert DynamicSampling(min_std=0.6)(b).tolist() == [False, False]


@pytest.mark.parametrize("seed", range(10))
def test_dynamic_sampling_matches_loop_reference(seed):
    # keep a row iff its group holds at least two distinct rewards (0/1 rewards and a few exact values)
    g = torch.Generator().manual_seed(seed)
    ids = random_groups(g, max_groups=6, max_size=4)
    vals = torch.tensor([0.0, 1.0, 0.5, -1.0])
    rewards = vals[torch.randint(0, 2 + seed % 3, (ids.numel(),), generator=g)]
    b = make_batch(rewards, ids, T=1)
    exp = [len({rewards[j].item() for j in range(len(ids)) if ids[j] == ids[i]}) > 1 for i in range(len(ids))]
    assert DynamicSampling()(b).tolist() == exp


def test_dynamic_sampling_drops_all_equal_non_dyadic_group():
    # regression: 3 x 0.9 used to be kept (float32 group mean 1 ulp off -> std 6e-8 > 0)
    for value in (0.9, 0.1, 0.3, 0.7):
        for n in (3, 6, 7, 8):
            b = make_batch([value] * n + [0.0, 1.0], [0] * n + [1, 1], T=1)
            assert DynamicSampling()(b).tolist() == [False] * n + [True, True], (value, n)


def test_dynamic_sampling_judges_task_rewards_before_shaping():
    # Eq. 11 counts correct replies: a group of wrong replies whose shaped rewards differ only by the overlong
    # penalty (group 0) is dropped; a group with one correct reply (group 1) is kept whatever the penalty did.
    b = make_batch([-1.0, 0.0, -0.5, 1.0, 0.0, 0.0], [0, 0, 0, 1, 1, 1], T=1)
    b = b.replace(reward_components=torch.tensor([[0.0], [0.0], [0.0], [1.0], [0.0], [0.0]]))
    assert DynamicSampling()(b).tolist() == [False, False, False, True, True, True]
    assert DynamicSampling(on="reward")(b).tolist() == [True] * 6  # the shaped reward varies in both groups
    # several reward functions: kept when any of them varies within the group
    two = make_batch([1.0, 1.0, 1.0, 1.0], [0, 0, 1, 1], T=1)
    two = two.replace(reward_components=torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.5, 0.5], [0.5, 0.5]]))
    assert DynamicSampling()(two).tolist() == [True, True, False, False]
    with pytest.raises(ConfigError, match='"task" or "reward"'):
        DynamicSampling(on="accuracy")


# =========================================================================== overlong penalty
def test_overlong_penalty_hand():
    # L_max 10, L_cache 4 -> start 6
    #   |y| 5 -> 0; 6 -> 0; 7 -> (6-7)/4 = -0.25; 8 -> -0.5; 10 (not truncated) -> (6-10)/4 = -1; 10 truncated -> -1
    lengths = [5, 6, 7, 8, 10, 10]
    b = make_batch([1.0, 1.0, 0.0, 1.0, 0.5, 1.0], None, lengths, T=10,
                   truncated=[False, False, False, False, False, True])
    out = OverlongPenalty(horizon=10, cache_length=4)(b)
    assert_close(out.rewards, torch.tensor([1.0, 1.0, -0.25, 0.5, -0.5, 0.0]))
    assert torch.equal(out.response_mask, b.response_mask)  # only the reward changes
    # factor scales the penalty: 0.5 * [0, 0, -0.25, -0.5, -1, -1]
    out = OverlongPenalty(horizon=10, cache_length=4, factor=0.5)(b)
    assert_close(out.rewards, torch.tensor([1.0, 1.0, -0.125, 0.75, 0.0, 0.5]))


def test_overlong_penalty_direct_and_defaults():
    pen = OverlongPenalty(horizon=10, cache_length=4)
    # |y| > L_max -> -1; a truncated flag forces -1 whatever the length
    assert_close(pen.penalty(torch.tensor([5.0, 12.0, 3.0]), torch.tensor([False, False, True])),
                 torch.tensor([0.0, -1.0, -1.0]))
    assert_close(pen.penalty(torch.tensor([5.0, 8.0]), None), torch.tensor([0.0, -0.5]))
    # default L_cache = 20% of L_max: 10 -> 2, start 8: 8 -> 0, 9 -> -0.5, 10 -> -1
    assert_close(OverlongPenalty(horizon=10).penalty(torch.tensor([8.0, 9.0, 10.0]), None),
                 torch.tensor([0.0, -0.5, -1.0]))
    with pytest.raises(ConfigError, match="horizon"):
        OverlongPenalty()(make_batch([1.0], None, [1], T=2))


def loop_penalty(length, truncated, l_max, l_cache, factor):
    if truncated or length > l_max:
        p = -1.0
    elif length <= l_max - l_cache:
        p = 0.0
    else:
        p = ((l_max - l_cache) - length) / l_cache
    return factor * p


@pytest.mark.parametrize("seed", range(6))
def test_overlong_penalty_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    l_max = int(torch.randint(4, 16, (1,), generator=g))
    l_cache = int(torch.randint(1, l_max + 1, (1,), generator=g))
    factor = float(torch.rand(1, generator=g)) * 2
    B = 12
    mask = torch.rand(B, l_max, generator=g) > 0.3  # holes: length = number of trained tokens
    truncated = torch.rand(B, generator=g) > 0.7
    rewards = torch.randn(B, generator=g)
    b = make_batch(rewards, None, mask, truncated=truncated)
    out = OverlongPenalty(horizon=l_max, cache_length=l_cache, factor=factor)(b)
    exp = [rewards[i].item() + loop_penalty(int(mask[i].sum()), bool(truncated[i]), l_max, l_cache, factor)
           for i in range(B)]
    assert_close(out.rewards, torch.tensor(exp))


def test_overlong_penalty_slope_analytic():
    # inside the soft zone dR/d|y| = -factor / L_cache; outside it 0
    lengths = torch.tensor([5.0, 7.0, 9.5, 12.0], dtype=F64, requires_grad=True)
    OverlongPenalty(horizon=10, cache_length=4, factor=0.5).penalty(lengths, None).sum().backward()
    assert_close(lengths.grad, torch.tensor([0.0, -0.125, -0.125, 0.0], dtype=F64))


# =========================================================================== overlong mask
def test_overlong_mask_masks_truncated_rows():
    b = make_batch([1.0, 0.0, 1.0], None, [[1, 1, 0], [1, 1, 1], [1, 0, 1]], truncated=[False, True, False])
    out = OverlongMask()(b)
    assert out.response_mask.tolist() == [[True, True, False], [False, False, False], [True, False, True]]
    assert torch.equal(out.rewards, b.rewards)
    no_flag = make_batch([1.0], None, [[1, 1]])
    assert OverlongMask()(no_flag) is no_flag
