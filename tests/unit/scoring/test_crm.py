"""CRM (arXiv:2505.10597): peer selection of the card (test 1), tau = 0 is two independent BT models (test 2), a
flipped pair both models already order the other way is dropped (test 3), the ramp, the gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmpo.train.crm import PeerPair, crm_step, drop_rate, peer_select


def test_card_peer_selection():
    # margins from A = [2.0, -1.0, 0.5, 3.0], keep 2 -> B trains on pairs 4 and 1 (1-based), i.e. indices 3 and 0
    assert peer_select(torch.tensor([2.0, -1.0, 0.5, 3.0]), 2).tolist() == [0, 3]
    assert peer_select(torch.tensor([1.0, 1.0, 0.0]), 1).tolist() == [0]  # ties: the earlier pair


def test_drop_rate_ramps_to_tau():
    assert [drop_rate(s, 0.3, 10) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 0.15, 0.3, 0.3])
    assert drop_rate(3, 0.3, 0) == 0.3


class Table(nn.Module):
    """A scorer whose reward for a reply is a learnable number per reply text (enough to test the selection)."""

    def __init__(self, values: dict[str, float]):
        super().__init__()
        self.keys = list(values)
        self.w = nn.Parameter(torch.tensor([values[k] for k in self.keys]))

    def rewards(self, rows):
        c = torch.stack([self.w[self.keys.index(r["chosen"])] for r in rows])
        r = torch.stack([self.w[self.keys.index(r["rejected"])] for r in rows])
        return c, r


def rows(pairs):
    return [{"chosen": c, "rejected": r, "margin": 0.0} for c, r in pairs]


def test_tau_zero_is_two_independent_bradley_terry_models():
    a, b = Table({"x": 1.0, "y": 0.0, "z": -1.0}), Table({"x": 0.5, "y": 0.2, "z": 0.0})
    batch = rows([("x", "y"), ("z", "x"), ("y", "z")])
    loss, _ = crm_step(PeerPair(a, b), lambda m, rs: m.rewards(rs), batch, step=5, tau=0.0, ramp=10)
    want = sum(-F.logsigmoid(m.rewards(batch)[0] - m.rewards(batch)[1]).mean() for m in (a, b))
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)


def test_flipped_pair_is_dropped_and_gets_no_gradient():
    # both models already rank x > y > z; the pair (z chosen over x) is a flipped label: negative margin for both
    a, b = Table({"x": 2.0, "y": 1.0, "z": 0.0}), Table({"x": 1.5, "y": 1.0, "z": -0.5})
    batch = rows([("x", "y"), ("y", "z"), ("z", "x"), ("x", "z")])
    loss, m = crm_step(PeerPair(a, b), lambda mod, rs: mod.rewards(rs), batch, step=10, tau=0.25, ramp=10)
    assert m["crm/kept_frac"] == 0.75  # keep ceil(0.75 * 4) = 3: the flipped pair is out for both models
    loss.backward()
    # A learns pairs 0, 1, 3 (B's three largest margins): d/dw_x = -(1 - s(1)) / 3 - (1 - s(2)) / 3 (x chosen twice)
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert a.w.grad[0].item() == pytest.approx(-((1 - s(1.0)) + (1 - s(2.0))) / 3, abs=1e-6)
    # z is only rejected among the kept pairs: its gradient is positive (pushed down), never pulled up
    assert a.w.grad[2].item() == pytest.approx(((1 - s(1.0)) + (1 - s(2.0))) / 3, abs=1e-6)
