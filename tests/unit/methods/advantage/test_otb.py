"""OTB (verl's optimal token baseline): A_{i,t} = G_{i,t} - sum_j G_{j,t} W_{j,t} / (sum_j W_{j,t} + eps),
W_t = sum_{s <= t} w_s with w = ||e_y - pi_old||^2 (extras["old_score_sq_norm"])."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.methods.advantage.otb import OTBAdvantage
from factories import make_batch, random_batch


def batch(rewards, groups, lengths, T, w):
    b = make_batch(rewards, groups, lengths, T=T)
    return b.replace(extras={"old_score_sq_norm": torch.tensor(w) * b.response_mask})


def test_hand():
    # one group of two rows, T = 2, both of length 2, R = [1, 0], w = [[1, 1], [3, 1]] -> W = [[1, 2], [3, 4]]
    #   t = 0: B = (1*1 + 0*3) / 4 = 0.25 -> A = [0.75, -0.25]
    #   t = 1: B = (1*2 + 0*4) / 6 = 1/3  -> A = [2/3, -1/3]
    b = batch([1.0, 0.0], [0, 0], [2, 2], 2, [[1.0, 1.0], [3.0, 1.0]])
    assert_close(OTBAdvantage(eps=0.0)(b), torch.tensor([[0.75, 2 / 3], [-0.25, -1 / 3]]))


def test_hand_zero_tail_and_singleton():
    # group 0: lengths 3 and 1 (R = 1, 0), w = 1 everywhere -> W = [[1, 2, 3], [1, 0, 0]]
    #   t = 0: B = (1*1 + 0*1)/2 = 0.5 -> A = [0.5, -0.5]; t = 1, 2: row 0 runs alone -> zero tail: B = 0, A = 1
    #   (without it B = G W / W = 1 and A = 0)
    # group 1: a singleton (R = 2): A = 0, or 2 with singleton="raw"
    w = [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    b = batch([1.0, 0.0, 2.0], [0, 0, 1], [3, 1, 2], 3, w)
    assert_close(OTBAdvantage(eps=0.0)(b), torch.tensor([[0.5, 1.0, 1.0], [-0.5, 0, 0], [0, 0, 0]]))
    assert_close(OTBAdvantage(eps=0.0, zero_tail=False)(b), torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0, 0], [0, 0, 0]]))
    assert_close(OTBAdvantage(eps=0.0, singleton="raw")(b)[2], torch.tensor([2.0, 2.0, 0.0]))


def test_card_property_equal_weights_give_the_group_mean_of_running_rows():
    # with w constant and equal lengths, W_t is the same for every row: B_t is the plain group mean (GRPO without std)
    b = batch([1.0, 0.0, 0.0, 1.0], [0, 0, 0, 0], [3, 3, 3, 3], 3, [[0.7] * 3] * 4)
    assert_close(OTBAdvantage(eps=0.0)(b), torch.tensor([0.5, -0.5, -0.5, 0.5])[:, None].expand(4, 3))
    # and the uncertain row's return dominates the baseline: raising its w moves B_t towards its return
    lo = batch([1.0, 0.0], [0, 0], [2, 2], 2, [[1.0, 1.0], [1.0, 1.0]])
    hi = batch([1.0, 0.0], [0, 0], [2, 2], 2, [[5.0, 5.0], [1.0, 1.0]])
    assert (OTBAdvantage()(hi)[0] < OTBAdvantage()(lo)[0]).all()


def loop_otb(b, eps, zero_tail):
    B, T = b.response_mask.shape
    m = b.response_mask.tolist()
    w = b.extras["old_score_sq_norm"].tolist()
    g = b.group_ids.tolist()
    R = b.rewards.tolist()
    G = [[R[i] if m[i][t] else 0.0 for t in range(T)] for i in range(B)]
    W = [[0.0] * T for _ in range(B)]
    for i in range(B):
        acc = 0.0
        for t in range(T):
            acc += w[i][t] if m[i][t] else 0.0
            W[i][t] = acc if m[i][t] else 0.0
    out = [[0.0] * T for _ in range(B)]
    for i in range(B):
        rows = [j for j in range(B) if g[j] == g[i]]
        if len(rows) == 1:
            continue
        for t in range(T):
            if not m[i][t]:
                continue
            running = [j for j in rows if m[j][t]]
            if zero_tail and len(running) == 1:
                base = 0.0
            else:
                base = sum(G[j][t] * W[j][t] for j in running) / (sum(W[j][t] for j in running) + eps)
            out[i][t] = G[i][t] - base
    return torch.tensor(out)


@pytest.mark.parametrize("zero_tail", [True, False])
def test_matches_loop_reference(zero_tail):
    for seed in range(6):
        b = random_batch(seed)
        w = torch.rand(b.response_mask.shape, generator=torch.Generator().manual_seed(seed)) * 1.9
        b = b.replace(extras={"old_score_sq_norm": w * b.response_mask})
        assert_close(OTBAdvantage(zero_tail=zero_tail)(b), loop_otb(b, 1e-8, zero_tail), atol=1e-5, rtol=1e-5)
