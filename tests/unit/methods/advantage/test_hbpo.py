"""HBPO (arXiv:2507.15844): budget sub-group plans, budget-aware reward, intra + inter sub-group advantage."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.grpo import GRPOAdvantage
from lmpo.methods.advantage.hbpo import HBPOAdvantage, HBPOBudgetReward
from lmpo.rollout import SamplingParams
from lmpo.train.rollouts import score
from factories import from_config, make_batch, random_groups
from unit.test_rollout_budgets import ROWS, make_ctx

F64 = torch.float64


def with_budget(batch, budget):
    batch.extras["budget"] = torch.tensor(budget, dtype=torch.float32)
    return batch


def test_hand_advantage():
    # one group, budgets [1, 1, 2, 2], R = [1, 0, 1, 1]
    # sub-group b=1: mean 0.5, unbiased std sqrt(0.5);  sub-group b=2: mean 1, std 0
    # group: mean 0.75, deviations .25 -.75 .25 .25 -> unbiased var 0.75/3 = 0.25 -> std 0.5
    # intra = [0.5, -0.5] / (sqrt(.5) + eps), [0, 0];  inter = (0.5 - 0.75)/(0.5 + eps) x2, (1 - 0.75)/(0.5 + eps) x2
    b = with_budget(make_batch([1.0, 0.0, 1.0, 1.0], [3, 3, 3, 3], [2, 1, 2, 2], T=2), [1.0, 1.0, 2.0, 2.0])
    e = 1e-6
    i, o = 0.5 / (math.sqrt(0.5) + e), 0.25 / (0.5 + e)
    want = torch.tensor([[i - o, i - o], [-i - o, 0.0], [o, o], [o, o]])
    assert_close(HBPOAdvantage()(b), want)


def reference(r, gid, bud, scale, eps=1e-6):
    out = []
    for i in range(len(r)):
        grp = [j for j in range(len(r)) if gid[j] == gid[i]]
        sub = [j for j in grp if bud[j] == bud[i]]
        mean = lambda idx: sum(r[j] for j in idx) / len(idx)  # noqa: E731
        std = lambda idx: math.sqrt(sum((r[j] - mean(idx)) ** 2 for j in idx) / (len(idx) - 1)) if len(idx) > 1 else 0.0  # noqa: E731
        intra, inter = r[i] - mean(sub), mean(sub) - mean(grp)
        if scale:
            intra, inter = intra / (std(sub) + eps), inter / (std(grp) + eps)
        out.append(intra + inter)
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale", [True, False])
def test_matches_loop_reference(seed, scale):
    g = torch.Generator().manual_seed(seed)
    gid = random_groups(g)
    B = gid.numel()
    r = torch.randint(0, 3, (B,), generator=g).float() / 2
    bud = (torch.randint(1, 4, (B,), generator=g) * 2).float()
    got = HBPOAdvantage(scale_by_std=scale)(with_budget(make_batch(r, gid, T=1), bud.tolist()))[:, 0]
    assert_close(got, reference(r.tolist(), gid.tolist(), bud.tolist(), scale), atol=1e-5, rtol=1e-5)


def test_property_unscaled_sum_is_centred_reward_and_no_budget_is_grpo():
    # card test (1): without std scaling intra + inter = R - group mean, whatever the sub-groups
    g = torch.Generator().manual_seed(0)
    gid = random_groups(g)
    r = torch.randn(gid.numel(), generator=g)
    b = with_budget(make_batch(r, gid, T=2), (torch.randint(1, 5, (gid.numel(),), generator=g)).tolist())
    assert_close(HBPOAdvantage(scale_by_std=False)(b), GRPOAdvantage(scale_by_std=False)(b))
    plain = make_batch(r, gid, T=2)  # no budgets: one sub-group per group -> GRPO's advantage
    assert_close(HBPOAdvantage()(plain), GRPOAdvantage()(plain))


def test_jacobian_unscaled():
    # A = R - mean_group R -> dA_i/dR_j = [same group] (d_ij - 1/|group|)
    gid = torch.tensor([0, 0, 1, 1, 1])
    J = torch.autograd.functional.jacobian(lambda r: HBPOAdvantage(scale_by_std=False)(
        with_budget(make_batch(r, gid, dtype=F64), [1.0, 2.0, 1.0, 1.0, 2.0]))[:, 0].double(), torch.randn(5, dtype=F64))
    want = torch.zeros(5, 5, dtype=F64)
    want[:2, :2] = torch.eye(2) - 0.5
    want[2:, 2:] = torch.eye(3) - 1 / 3
    assert_close(J, want)


def test_plan_group_splits_evenly_and_scales_budgets():
    adv = HBPOAdvantage(horizon=4)  # 512, 1024, 2048, 2560 of 2560 -> 0.8, 1.6, 3.2, 4 -> 1, 2, 3, 4
    plans = adv.plan_group(8)
    assert [p["tags"]["budget"] for p in plans] == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]
    assert [p["max_new_tokens"] for p in plans] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert plans[2]["prompt_suffix"] == "\nI will answer the question within 2 tokens.\n"
    assert [p["tags"]["budget"] for p in adv.plan_group(6)] == [1.0, 1.0, 2.0, 3.0, 3.0, 4.0]  # card test (3)
    assert "max_new_tokens" not in HBPOAdvantage(limit_factor=None).plan_group(1)[0]
    assert [p["max_new_tokens"] for p in HBPOAdvantage(horizon=4, limit_factor=1.5).plan_group(4)] == [2, 3, 5, 6]


def test_collection_carries_budgets_into_extras():
    batch = score(make_ctx(), ROWS[:2], 4, SamplingParams(max_new_tokens=3),
                  plan_group=HBPOAdvantage(horizon=4, hint="[{budget}]").plan_group)
    assert batch.extras["budget"].tolist() == [1.0, 2.0, 3.0, 4.0] * 2
    assert batch.meta[1]["prompt"].endswith("[2]") and batch.meta[3]["prompt"].endswith("[4]")


def test_budget_reward_hand_and_monotone():
    # b = 4, alpha = 1: n = 3 -> 1; n = 6 -> 1 - 2/4 = 0.5; n = 12 -> max(0, 1 - 2) = 0; c = 0 -> 0
    sh = HBPOBudgetReward(alpha=1.0)
    b = with_budget(make_batch([1.0, 1.0, 1.0, 0.0], [0, 0, 0, 0], [3, 6, 12, 2], T=12), [4.0] * 4)
    assert sh(b).rewards.tolist() == [1.0, 0.5, 0.0, 0.0]
    n = torch.arange(1, 30, dtype=F64)
    f = sh.factor(n, torch.full_like(n, 8.0))
    assert (f[1:] <= f[:-1]).all()  # card test (2): more overshoot never increases the reward
    assert sh(make_batch([0.7], T=2)).rewards.tolist() == pytest.approx([0.7])  # no budget: unchanged


def test_budget_reward_gradient_in_length():
    # df/dn = -alpha / b beyond the budget, 0 inside it
    n = torch.tensor([3.0, 6.0, 7.0], dtype=F64, requires_grad=True)
    HBPOBudgetReward(alpha=0.5).factor(n, torch.full((3,), 4.0, dtype=F64)).sum().backward()
    assert_close(n.grad, torch.tensor([0.0, -0.125, -0.125], dtype=F64))


def test_validation():
    for kw, key in (({"budgets": (0, 5)}, "budgets"), ({"limit_factor": 0.0}, "limit_factor"),
                    ({"hint": "{oops}"}, "hint"), ({"eps": -1.0}, "eps")):
        with pytest.raises(ConfigError, match=key):
            from_config(HBPOAdvantage, **kw)
    with pytest.raises(ConfigError, match="alpha"):
        from_config(HBPOBudgetReward, alpha=-1.0)
