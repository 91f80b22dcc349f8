"""KTO (arXiv:2402.01306, Eq. 8) by hand, with unpaired rows (an absent side has an all-False mask)."""

import math

import torch

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps
from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_kto_paired_hand_value_and_gradient():
    # implied rewards r_w = 1, r_l = -1 -> z_0 = max(0, mean(1, -1)) = 0; beta 1:
    # (1 - s(1)) + (1 - s(1)) = 2 s(-1); d/dr_w = -s'(1), d/dr_l = +s'(1)
    batch, policy, ref = pair_case([[0.0]], [[-2.0]], [[-1.0]], [[-1.0]])
    out = PREFERENCE_LOSSES.build("kto", beta=1.0)(batch, policy, ref)
    s = 1 / (1 + math.e)
    assert abs(out.per_pair.item() - 2 * s) < 1e-12
    out.per_pair.sum().backward()
    ds = s * (1 - s)
    assert abs(policy.chosen.grad.item() + ds) < 1e-12 and abs(policy.rejected.grad.item() - ds) < 1e-12


def test_kto_unpaired_rows_and_the_reference_point():
    # row 0: desirable only (r = 2); row 1: undesirable only (r = 1) -> z_0 = 1.5; beta 1, lambda_U 2
    batch = PreferenceBatch(prompt_ids=torch.ones(2, 1, dtype=torch.long), chosen_ids=torch.ones(2, 1, dtype=torch.long),
                            chosen_mask=torch.tensor([[True], [False]]), rejected_ids=torch.ones(2, 1, dtype=torch.long),
                            rejected_mask=torch.tensor([[False], [True]]))
    policy = PairLogps(torch.tensor([[1.0], [0.0]], dtype=torch.float64), torch.tensor([[0.0], [0.0]], dtype=torch.float64))
    ref = PairLogps(torch.tensor([[-1.0], [0.0]], dtype=torch.float64), torch.tensor([[0.0], [-1.0]], dtype=torch.float64))
    out = PREFERENCE_LOSSES.build("kto", beta=1.0, undesirable_weight=2.0)(batch, policy, ref)
    sig = torch.sigmoid
    want = torch.tensor([1 - sig(torch.tensor(0.5)).item(), 2 * (1 - sig(torch.tensor(0.5)).item())], dtype=torch.float64)
    assert torch.allclose(out.per_pair, want)
    assert out.metrics["loss/kl"].item() == 1.5 and "rewards/margins" not in out.metrics
