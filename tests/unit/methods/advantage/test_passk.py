"""Pass@k with k = n (arXiv:2505.15201 k = n; verl grpo_passk): A_best = R_(1) - R_(2), 0 for every other row."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from lmpo.methods.advantage.passk import PassKAdvantage
from factories import make_batch, random_batch


def test_hand():
    # groups [0, 0, 0, 1, 1, 2]; R = [0.2, 0.9, 0.5, 1, 1, 3]
    #   group 0: best row 1, margin 0.9 - 0.5 = 0.4; group 1: tie -> first best row 3, margin 0; group 2: alone -> 0
    b = make_batch([0.2, 0.9, 0.5, 1.0, 1.0, 3.0], [0, 0, 0, 1, 1, 2], T=1)
    assert_close(PassKAdvantage()(b)[:, 0], torch.tensor([0.0, 0.4, 0.0, 0.0, 0.0, 0.0]))
    # with the std: group 0 std (unbiased) of [0.2, 0.9, 0.5] = sqrt(((-.333)^2 + .367^2 + .033^2)/2)
    std = torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64).std().item()
    out = PassKAdvantage(scale_by_std=True)(b)[:, 0]
    assert_close(out[1].item(), 0.4 / (std + 1e-6), atol=1e-6, rtol=1e-6)


def test_card_property_is_the_leave_one_out_gradient_of_the_group_max():
    # A_i = max_j R_j - max_{j != i} R_j for every row (the marginal value of i to the group's maximum)
    for seed in range(6):
        b = random_batch(seed)
        a = PassKAdvantage()(b)
        R = b.rewards.tolist()
        g = b.group_ids.tolist()
        for i in range(len(R)):
            others = [R[j] for j in range(len(R)) if g[j] == g[i] and j != i]
            exp = max(R[j] for j in range(len(R)) if g[j] == g[i]) - max(others) if others else 0.0
            row = a[i][b.response_mask[i]]
            assert all(abs(v - exp) < 1e-5 for v in row.tolist()), (seed, i)


def test_binary_rewards_push_only_a_lonely_success():
    # 0/1 rewards: only a group with exactly one success learns (A = 1 on it); two successes -> no signal
    b = make_batch([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], [0, 0, 0, 1, 1, 1], T=1)
    assert_close(PassKAdvantage()(b)[:, 0], torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0]))


def loop_passk(R, g):
    out = [0.0] * len(R)
    for k in set(g):
        idx = [i for i in range(len(R)) if g[i] == k]
        if len(idx) < 2:
            continue
        best = max(idx, key=lambda i: (R[i], -i))
        second = max(R[i] for i in idx if i != best)
        out[best] = R[best] - second
    return out


@pytest.mark.parametrize("seed", range(8))
def test_matches_loop_reference(seed):
    b = random_batch(seed, discrete_rewards=seed % 2 == 1)
    a = PassKAdvantage()(b)
    exp = torch.tensor(loop_passk(b.rewards.tolist(), b.group_ids.tolist()))[:, None] * b.response_mask
    assert_close(a, exp.float())


def test_expected_max_gradient_exact_on_a_two_armed_bandit():
    # pi = (p, 1 - p) over rewards (1, 0) with n = 2 samples: E[max] = 1 - (1-p)^2, d/dp = 2 (1 - p).
    # Exact expectation of sum_i A_i d log pi(y_i)/dp over all 4 sample pairs equals that derivative.
    p = 0.3
    total = 0.0
    for ys in itertools.product([0, 1], repeat=2):
        prob = math.prod(p if y == 0 else 1 - p for y in ys)
        R = [1.0 if y == 0 else 0.0 for y in ys]
        A = PassKAdvantage()(make_batch(R, [0, 0], T=1))[:, 0].tolist()
        dlog = [1 / p if y == 0 else -1 / (1 - p) for y in ys]
        total += prob * sum(a * d for a, d in zip(A, dlog))
    assert abs(total - 2 * (1 - p)) < 1e-6
