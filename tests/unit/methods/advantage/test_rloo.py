"""RLOO leave-one-out advantage (arXiv:2402.14740 Eq. 7): A_i = R_i - mean_{j != i} R_j."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.methods.advantage.rloo import RLOOAdvantage
from factories import make_batch, random_batch


def test_hand():
    # R = [1, 0, 0.5, 3], groups [0, 0, 0, 1], lengths [3, 2, 1, 3]
    #   row 0: 1   - (0 + 0.5)/2 = 0.75
    #   row 1: 0   - (1 + 0.5)/2 = -0.75
    #   row 2: 0.5 - (1 + 0)/2   = 0
    #   row 3: singleton -> no baseline -> 0
    # (check: k/(k-1) (R - mean) = 3/2 * [0.5, -0.5, 0] = [0.75, -0.75, 0])
    b = make_batch([1.0, 0.0, 0.5, 3.0], [0, 0, 0, 1], [3, 2, 1, 3], T=3)
    exp = torch.tensor([[0.75, 0.75, 0.75], [-0.75, -0.75, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(RLOOAdvantage()(b), exp)


def test_hand_token_rewards_enter_the_return():
    # R = rewards + masked sum of token rewards: row 0: 1 + 0.5 = 1.5; row 1: 0 + (-1) = -1 (the 9 is padding)
    # k = 2: A_0 = 1.5 - (-1) = 2.5, A_1 = -1 - 1.5 = -2.5
    b = make_batch([1.0, 0.0], [3, 3], [[1, 1], [1, 0]], token_rewards=[[0.25, 0.25], [-1.0, 9.0]])
    assert_close(RLOOAdvantage()(b), torch.tensor([[2.5, 2.5], [-2.5, 0.0]]))


@pytest.mark.parametrize("seed", range(5))
def test_property_scaled_centering_and_singletons(seed):
    b = random_batch(seed)
    adv = RLOOAdvantage()(b)
    assert torch.all(adv[~b.response_mask] == 0)
    g, R = b.group_ids, b.rewards
    for gid in g.unique():
        rows = g == gid
        k = int(rows.sum())
        a = adv[rows, 0]
        if k == 1:
            assert a.item() == 0.0
        else:
            assert_close(a, k / (k - 1) * (R[rows] - R[rows].mean()))
            assert abs(a.double().sum().item()) < 1e-5


def loop_rloo(b):
    B, T = b.response_mask.shape
    R = []
    for i in range(B):
        r = b.rewards[i].item()
        if b.token_rewards is not None:
            r += sum(b.token_rewards[i, t].item() for t in range(T) if b.response_mask[i, t])
        R.append(r)
    out = []
    for i in range(B):
        others = [R[j] for j in range(B) if j != i and b.group_ids[j] == b.group_ids[i]]
        a = R[i] - sum(others) / len(others) if others else 0.0
        out.append([a if b.response_mask[i, t] else 0.0 for t in range(T)])
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(10))
def test_matches_loop_reference(seed):
    b = random_batch(seed, token_rewards=seed % 2 == 0)
    assert_close(RLOOAdvantage()(b), loop_rloo(b))


def test_jacobian_analytic():
    # A_i = R_i - sum_{j != i, same group} R_j / (k - 1) -> dA_i/dR_j = delta_ij - [j != i, same group]/(k - 1);
    # a singleton row has A = 0, so its Jacobian row is 0.
    gid = torch.tensor([2, 5, 2, 2, 5, 9])
    mask = torch.ones(6, 1, dtype=torch.bool)
    J = torch.autograd.functional.jacobian(lambda r: RLOOAdvantage()(make_batch(r, gid, mask))[:, 0], torch.randn(6))
    same = (gid[:, None] == gid[None, :]).float()
    k = same.sum(1, keepdim=True)
    exp = torch.eye(6) - (same - torch.eye(6)) / (k - 1).clamp_min(1)
    exp[k[:, 0] == 1] = 0.0
    assert_close(J, exp)


def test_hand_singleton_raw():
    # the test_hand batch with singleton="raw" (verl's compute_rloo_outcome_advantage): row 3 keeps R = 3
    b = make_batch([1.0, 0.0, 0.5, 3.0], [0, 0, 0, 1], [3, 2, 1, 3], T=3)
    exp = torch.tensor([[0.75, 0.75, 0.75], [-0.75, -0.75, 0.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    assert_close(RLOOAdvantage(singleton="raw")(b), exp)
