"""Robust DPO (arXiv:2403.00409) by hand, and its defining property: unbiased under label flips."""

import math

import torch
import torch.nn.functional as F

from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_robust_dpo_at_zero_margin_is_log2_and_gradient():
    # h = 0: [(1 - e) ln2 - e ln2] / (1 - 2e) = ln 2 for every e
    batch, policy, ref = pair_case([[-1.0]], [[-2.0]], [[-1.0]], [[-2.0]])
    out = PREFERENCE_LOSSES.build("robust_dpo", beta=0.5, label_smoothing=0.25)(batch, policy, ref)
    assert abs(out.per_pair.item() - math.log(2)) < 1e-12
    out.per_pair.sum().backward()
    # dL/dx at x = 0: [-(1 - e) * 0.5 - e * 0.5] / (1 - 2e) = -0.5 / 0.5 = -1; times beta on the chosen token
    assert abs(policy.chosen.grad.item() - (-0.5)) < 1e-12 and abs(policy.rejected.grad.item() - 0.5) < 1e-12


def test_expected_robust_loss_under_flips_is_the_clean_dpo_loss():
    eps, beta = 0.2, 1.0
    loss = PREFERENCE_LOSSES.build("robust_dpo", beta=beta, label_smoothing=eps)
    for h in (-2.0, -0.3, 0.0, 0.7, 3.0):
        batch, policy, ref = pair_case([[h]], [[0.0]], [[0.0]], [[0.0]])
        flipped = pair_case([[0.0]], [[h]], [[0.0]], [[0.0]])
        expect = (1 - eps) * loss(batch, policy, ref).per_pair + eps * loss(*flipped).per_pair
        assert torch.allclose(expect, -F.logsigmoid(torch.tensor([h], dtype=torch.float64)))
