"""BRPO / AnytimeReasoner (arXiv:2505.13438): budget-relative per-segment advantages over truncated-reply rewards."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.errors import ConfigError
from lmpo.methods.advantage.brpo import BRPOAdvantage, brpo_segment_advantages, budget_prior
from lmpo.methods.advantage.grpo import GRPOAdvantage
from factories import from_config, make_batch, random_groups

F64 = torch.float64


def test_card_worked_example():
    # S = 2, p = [0.5, 0.5], G = 2, r_1 = [0, 1] (trace 1), r_2 = [1, 1] (trace 2)
    # s = 0: R = 0.5*0 + 0.5*1 = 0.5 and 1.0, V2 = 0.75 -> A = -0.25, +0.25 (B = V2 at s = 0)
    # s = 1: R = 0.5, 0.5; V2 = 0.5; V1 = (2^0 r_0 / 2^0) * 0.5 = 0 and 0.5; B = (1*V1 + 1*V2)/2 = 0.25, 0.5
    #        -> A = 0.25, 0.0
    r = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=F64)
    got = brpo_segment_advantages(r, torch.tensor([0, 0]), torch.tensor([0.5, 0.5], dtype=F64))
    assert_close(got, torch.tensor([[-0.25, 0.25], [0.25, 0.0]], dtype=F64))


def test_tokens_take_their_segment_advantage():
    # horizon 4, budgets (2000, 4000, 6000, 8000) -> cuts 1, 2, 3, 4: token t lies in segment t (0-indexed)
    # a single budget pair: budgets (4000, 8000) -> cuts 2, 4: tokens 0-1 in segment 0, tokens 2-3 in segment 1
    adv = BRPOAdvantage(budgets=(4000, 8000), horizon=4)
    assert adv.prefix_budgets() == [2, 4]
    b = make_batch([0.0, 0.0], [0, 0], [4, 3], T=4)
    b.extras["prefix_rewards"] = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    want = torch.tensor([[-0.25, -0.25, 0.25, 0.25], [0.25, 0.25, 0.0, 0.0]])  # row 1: length 3 -> token 3 masked
    assert_close(adv(b), want)
    assert BRPOAdvantage(horizon=4).prefix_budgets() == [1, 2, 3, 4]
    assert BRPOAdvantage(horizon=2).prefix_budgets() == [1, 2]  # 0.5 -> 1 (at least one token), duplicates merged


def test_single_budget_is_dr_grpo():
    # card test (a): S = 1, p = [1] -> R = r, B = mean_g r -> A = r - mean (GRPO without std)
    b = make_batch([1.0, 0.0, 0.5, 2.0, 3.0], [0, 0, 0, 1, 1], [2, 1, 2, 2, 1], T=2)
    assert_close(BRPOAdvantage()(b), GRPOAdvantage(scale_by_std=False)(b))


def reference(r, gid, p, base=2.0):
    B, S = r.shape
    out = torch.zeros(B, S, dtype=F64)
    for g in range(B):
        mates = [h for h in range(B) if gid[h] == gid[g]]
        for s in range(S):
            R = lambda h: sum(p[k] * r[h, k] for k in range(s, S))  # noqa: E731
            v2 = sum(R(h) for h in mates) / len(mates)
            tail = sum(p[k] for k in range(s, S))
            v1 = 0.0
            if s > 0:
                v1 = sum(base**j * r[g, j] for j in range(s)) / sum(base**j for j in range(s)) * tail
            out[g, s] = R(g) - (s * v1 + (S - s) * v2) / S
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference_on_unequal_groups(seed):
    g = torch.Generator().manual_seed(seed)
    gid = random_groups(g)
    S = int(torch.randint(1, 5, (1,), generator=g))
    r = torch.randint(0, 2, (gid.numel(), S), generator=g).to(F64) * torch.rand(gid.numel(), S, generator=g, dtype=F64)
    for prior in ("uniform", "linear", "base"):
        p = budget_prior([1000 * (i + 1) for i in range(S)], prior)
        assert_close(brpo_segment_advantages(r, gid, p), reference(r, gid.tolist(), p.tolist()))


def test_priors():
    assert_close(budget_prior([1, 2, 3, 4], "uniform"), torch.full((4,), 0.25, dtype=F64))
    assert_close(budget_prior([1, 2, 3, 4], "linear"), torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64))
    assert_close(budget_prior([1, 2, 3, 4], "base"), torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=F64))


def test_jacobian_against_analytic():
    # S = 2, uniform prior, one group of G = 3. R_0 = (r_0 + r_1)/2, R_1 = r_1/2; V1_{.,1} = r_0 * 1/2.
    # A_{g,0} = R_{g,0} - mean R_{.,0}              -> dA_{g,0}/dr_{h,k} = (d_gh - 1/3)/2       (k = 0, 1)
    # A_{g,1} = R_{g,1} - (V1_{g,1} + V2_1)/2       -> dA_{g,1}/dr_{h,0} = -d_gh/4,
    #   (B_{g,1} = (r_{g,0}/2 + mean_h r_{h,1}/2)/2)  dA_{g,1}/dr_{h,1} = d_gh/2 - (1/3)(1/2)/2 = d_gh/2 - 1/12
    gid = torch.zeros(3, dtype=torch.long)
    p = torch.tensor([0.5, 0.5], dtype=F64)
    J = torch.autograd.functional.jacobian(lambda r: brpo_segment_advantages(r, gid, p), torch.rand(3, 2, dtype=F64))
    eye = torch.eye(3, dtype=F64)
    want = torch.zeros(3, 2, 3, 2, dtype=F64)
    want[:, 0, :, 0] = (eye - 1 / 3) / 2
    want[:, 0, :, 1] = (eye - 1 / 3) / 2
    want[:, 1, :, 0] = -eye / 4
    want[:, 1, :, 1] = eye / 2 - 1 / 12
    assert_close(J, want)


def test_v2only_and_validation():
    r = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=F64)
    got = brpo_segment_advantages(r, torch.tensor([0, 0]), torch.tensor([0.5, 0.5], dtype=F64), v2_only=True)
    assert_close(got, torch.tensor([[-0.25, 0.0], [0.25, 0.0]], dtype=F64))
    for kw, key in (({"budgets": (4, 2)}, "budgets"), ({"prior": "flat"}, "prior"), ({"base": 0.0}, "base"),
                    ({"variance_reduction": "x"}, "variance_reduction")):
        with pytest.raises(ConfigError, match=key):
            from_config(BRPOAdvantage, **kw)
    b = make_batch([0.0], T=2)
    b.extras["prefix_rewards"] = torch.zeros(1, 3)
    with pytest.raises(ConfigError, match="prefix_rewards"):
        BRPOAdvantage(horizon=4)(b)
