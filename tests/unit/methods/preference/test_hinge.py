"""Hinge / SLiC (arXiv:2305.10425) by hand."""

import torch

from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_hinge_hand_value_gradient_and_margin():
    # log-ratio margin h = 1 - (-1) = 2; beta 0.25 -> 1 - 0.5 = 0.5; gradient -beta on chosen tokens, +beta on rejected
    batch, policy, ref = pair_case([[-1.0, -2.0]], [[-3.0]], [[-1.5, -2.5]], [[-2.0]])
    out = PREFERENCE_LOSSES.build("hinge", beta=0.25)(batch, policy, ref)
    out.per_pair.sum().backward()
    assert abs(out.per_pair.item() - 0.5) < 1e-12
    assert torch.allclose(policy.chosen.grad, torch.full((1, 2), -0.25, dtype=torch.float64))
    assert torch.allclose(policy.rejected.grad, torch.full((1, 1), 0.25, dtype=torch.float64))
    # past the margin (beta 0.5: 1 - 1 = 0) a pair stops pulling
    batch, policy, ref = pair_case([[-1.0, -2.0]], [[-3.0]], [[-1.5, -2.5]], [[-2.0]])
    out = PREFERENCE_LOSSES.build("hinge", beta=0.5)(batch, policy, ref)
    out.per_pair.sum().backward()
    assert out.per_pair.item() == 0.0 and policy.chosen.grad.abs().max() == 0


def test_reference_free_hinge_is_slic():
    # SLiC: max(0, delta - log p(y_w) + log p(y_l)) with delta = 1 / beta = 2: 2 - (-3) + (-4) = 1 -> beta * 1 = 0.5
    batch, policy, _ = pair_case([[-1.0, -2.0]], [[-4.0]])
    loss = PREFERENCE_LOSSES.build("hinge", beta=0.5, reference_free=True)
    assert loss.needs == frozenset()
    assert abs(loss(batch, policy, None).per_pair.item() - 0.5) < 1e-12
