"""RED-Drop (arXiv:2509.24203): drop each group's surplus negatives, mean baseline over what is kept."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from lmpo import ops
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.advantage.red_drop import REDDropAdvantage
from lmpo.methods.presets import PRESETS
from factories import make_batch


def with_ids(batch, ids):
    return dataclasses.replace(batch, response_ids=torch.as_tensor(ids, dtype=torch.long))


def test_hand_one_positive_three_negatives():
    # group [1, 0, 0, 0]: mean 0.25, 1 positive, 3 negatives -> drop 2 negatives; kept {1, one 0}: mean 0.5
    #   -> A = +0.5 for the positive, -0.5 for the kept negative, 0 for the two dropped rows
    b = with_ids(make_batch([1.0, 0, 0, 0], T=2), [[5, 1], [6, 2], [7, 3], [8, 4]])
    adv = REDDropAdvantage()(b)[:, 0]
    assert adv[0] == 0.5
    assert sorted(adv[1:].tolist()) == [-0.5, 0.0, 0.0]
    # which negative survives is the one with the largest hash among the negatives
    key = ops.token_hash(b.response_ids, b.response_mask, 0)
    kept = 1 + int(torch.argmax(key[1:]))
    assert adv[kept] == -0.5


def test_hand_std_normalised():
    # same group with scale_by_std: kept {1, 0} has population std 0.5 -> A = +-1 (eps aside)
    b = with_ids(make_batch([1.0, 0, 0, 0], T=1), [[1], [2], [3], [4]])
    adv = REDDropAdvantage(scale_by_std=True, eps=0.0)(b)[:, 0]
    assert adv[0] == 1.0 and sorted(adv[1:].tolist()) == [-1.0, 0.0, 0.0]


def test_positive_majority_group_is_plain_mean_baseline():
    # [1, 1, 1, 0]: 3 positives >= 1 negative -> nothing dropped, A = R - mean = Dr.GRPO
    b = with_ids(make_batch([1.0, 1, 1, 0, 0.5, 0.5], [0, 0, 0, 0, 1, 1], T=3), torch.arange(18).view(6, 3))
    assert_close(REDDropAdvantage()(b), GRPOAdvantage(scale_by_std=False)(b))


def reference(rewards, groups, keys, scale_by_std=False, eps=1e-6):
    """Slow loop transcription of the released rule (random choice replaced by the smallest keys)."""
    out = [0.0] * len(rewards)
    for g in sorted(set(groups)):
        idx = [i for i in range(len(rewards)) if groups[i] == g]
        r = [rewards[i] for i in idx]
        m = sum(r) / len(r)
        pos = [i for i in idx if rewards[i] >= m]
        neg = [i for i in idx if rewards[i] < m]
        drop = set()
        if len(neg) > len(pos):
            drop = set(sorted(neg, key=lambda i: (keys[i], i))[: len(neg) - len(pos)])
        kept = [i for i in idx if i not in drop]
        if len(kept) <= 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(rewards[i] for i in kept) / len(kept)
            std = (sum((rewards[i] - mean) ** 2 for i in kept) / len(kept)) ** 0.5 + eps
        for i in kept:
            out[i] = (rewards[i] - mean) / std if scale_by_std else rewards[i] - mean
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", [False, True])
def test_matches_loop_reference_and_balances_groups(seed, scale):
    g = torch.Generator().manual_seed(seed)
    B, T = 15, 4
    groups = torch.tensor([0] * 6 + [1] * 5 + [2] * 3 + [3])
    rewards = torch.randint(0, 3, (B,), generator=g).float() / 2
    b = with_ids(make_batch(rewards, groups, T=T), torch.randint(0, 50, (B, T), generator=g))
    adv = REDDropAdvantage(scale_by_std=scale)(b)[:, 0]
    keys = ops.token_hash(b.response_ids, b.response_mask, 0).tolist()
    exp = reference(rewards.tolist(), groups.tolist(), keys, scale)
    assert_close(adv, torch.tensor(exp), atol=1e-5, rtol=1e-5)
    # card property: after the drop, no group has more (kept) negatives than positives
    mean = ops.group_mean(rewards, groups)
    for gi in range(4):
        sel = groups == gi
        n_pos = int((rewards[sel] >= mean[sel]).sum())
        kept_neg = int(((rewards[sel] < mean[sel]) & (adv[sel] != 0)).sum())
        assert kept_neg <= n_pos


def test_row_order_does_not_change_the_result():
    g = torch.Generator().manual_seed(3)
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 1, 0, 0])
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    b = with_ids(make_batch(rewards, groups, T=3), torch.randint(0, 30, (8, 3), generator=g))
    perm = torch.randperm(8, generator=g)
    pb = dataclasses.replace(b, rewards=b.rewards[perm], group_ids=b.group_ids[perm],
                             response_ids=b.response_ids[perm], response_mask=b.response_mask[perm])
    assert_close(REDDropAdvantage()(pb), REDDropAdvantage()(b)[perm])


def test_preset_is_rec_without_clipping():
    p = PRESETS["red_drop"]
    assert p["advantage"]["name"] == "red_drop" and p["loss"]["clip_mode"] == "none" and p["loss"]["weight"] == "none"
