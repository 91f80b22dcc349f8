"""OPO (arXiv:2505.23585): A_i = R_i - sum_j l_j R_j / sum_j l_j within the prompt's group."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmpo.methods.advantage.opo import OPOAdvantage
from factories import make_batch, random_batch


def test_hand():
    # R = [1, 0, 0, 2], lengths [3, 1, 2, 4], groups [0, 0, 0, 1]
    #   group 0: b = (3*1 + 1*0 + 2*0) / 6 = 0.5 -> A = [0.5, -0.5, -0.5]; group 1 (singleton): A = 0 (raw: 2)
    b = make_batch([1.0, 0.0, 0.0, 2.0], [0, 0, 0, 1], [3, 1, 2, 4], T=4)
    exp = torch.tensor([[0.5] * 3 + [0.0], [-0.5, 0, 0, 0], [-0.5, -0.5, 0, 0], [0.0] * 4])
    assert_close(OPOAdvantage()(b), exp)
    exp[3] = 2.0
    assert_close(OPOAdvantage(singleton="raw")(b), exp)


def test_card_property_equal_lengths_give_the_group_mean_and_long_answers_weigh_more():
    b = make_batch([1.0, 0.0, 0.0, 1.0], [0, 0, 0, 0], [2, 2, 2, 2], T=2)
    assert_close(OPOAdvantage()(b)[:, 0], torch.tensor([0.5, -0.5, -0.5, 0.5]))  # = R - mean when l is constant
    # lengthening the correct answer raises the baseline (it weighs more), lowering every advantage
    longer = make_batch([1.0, 0.0, 0.0, 1.0], [0, 0, 0, 0], [6, 2, 2, 2], T=6)
    assert (OPOAdvantage()(longer)[:, 0] < OPOAdvantage()(b)[:, 0]).all()
    # the length-weighted mean of the advantages is 0 in every group (the baseline's defining equation)
    bb = random_batch(4)
    a = OPOAdvantage()(bb).double()
    lengths = bb.response_mask.double().sum(-1)
    for g in bb.group_ids.unique():
        rows = (bb.group_ids == g) & (lengths > 0)
        if rows.any():
            first = a[rows].gather(1, bb.response_mask[rows].double().argmax(-1, keepdim=True))[:, 0]
            assert abs(float((lengths[rows] * first).sum())) < 1e-5


def loop_opo(b):
    R = b.rewards.tolist()
    L = b.response_mask.sum(-1).tolist()
    g = b.group_ids.tolist()
    out = []
    for i in range(len(R)):
        idx = [j for j in range(len(R)) if g[j] == g[i]]
        den = sum(L[j] for j in idx)
        base = sum(L[j] * R[j] for j in idx) / den if den else sum(R[j] for j in idx) / len(idx)
        out.append(R[i] - base)
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(8))
def test_matches_loop_reference(seed):
    b = random_batch(seed)
    adv = OPOAdvantage()(b)
    assert_close(adv, (loop_opo(b)[:, None] * b.response_mask).float())
