"""SimPO (arXiv:2405.14734, Eq. 6) by hand."""

import math

import torch

from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_simpo_hand_value_and_gradient():
    # mean log-probs: chosen (-0.5 - 1.5) / 2 = -1, rejected -2; beta 2, gamma 1 -> h = 2 * 1 - 1 = 1
    batch, policy, _ = pair_case([[-0.5, -1.5]], [[-2.0]])
    loss = PREFERENCE_LOSSES.build("simpo", beta=2.0, gamma=1.0)
    out = loss(batch, policy, None)
    assert loss.needs == frozenset()
    assert abs(out.per_pair.item() - math.log1p(math.exp(-1))) < 1e-12
    out.per_pair.sum().backward()
    s = 1 / (1 + math.e)  # sigmoid(-1); dh/d(chosen token) = beta / |y_w| = 1, dh/d(rejected) = -2
    assert torch.allclose(policy.chosen.grad, torch.tensor([[-s, -s]], dtype=torch.float64))
    assert torch.allclose(policy.rejected.grad, torch.tensor([[2 * s]], dtype=torch.float64))


def test_simpo_is_length_normalised():
    # repeating every token of both responses leaves the loss unchanged (a summed reward would double)
    loss = PREFERENCE_LOSSES.build("simpo")
    a = loss(*pair_case([[-0.5, -1.5]], [[-2.0]], requires_grad=False)[:2], None).per_pair
    b = loss(*pair_case([[-0.5, -1.5] * 2], [[-2.0] * 2], requires_grad=False)[:2], None).per_pair
    assert torch.allclose(a, b)
