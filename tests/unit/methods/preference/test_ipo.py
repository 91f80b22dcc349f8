"""IPO (arXiv:2310.12036, Eq. 17) by hand."""

import torch

from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_ipo_hand_value_and_gradient_token_averaged():
    # chosen log-ratios per token 0.5, 0.5 -> mean 0.5; rejected -1 -> h = 1.5; beta 0.25 -> target 2, loss 0.25
    batch, policy, ref = pair_case([[-1.0, -2.0]], [[-3.0]], [[-1.5, -2.5]], [[-2.0]])
    out = PREFERENCE_LOSSES.build("ipo", beta=0.25)(batch, policy, ref)
    assert torch.allclose(out.per_pair, torch.tensor([0.25], dtype=torch.float64))
    out.per_pair.sum().backward()
    # dL/dh = 2 (h - 2) = -1; dh/d(chosen token) = 1/2, dh/d(rejected token) = -1
    assert torch.allclose(policy.chosen.grad, torch.tensor([[-0.5, -0.5]], dtype=torch.float64))
    assert torch.allclose(policy.rejected.grad, torch.tensor([[1.0]], dtype=torch.float64))


def test_ipo_sequence_form_has_its_minimum_at_the_finite_target():
    # summed log-ratios: h = 1 - (-1) = 2 = 1 / (2 * 0.25): the loss and its gradient vanish (DPO's would not)
    batch, policy, ref = pair_case([[-1.0, -2.0]], [[-3.0]], [[-1.5, -2.5]], [[-2.0]])
    out = PREFERENCE_LOSSES.build("ipo", beta=0.25, length_normalize=False)(batch, policy, ref)
    out.per_pair.sum().backward()
    assert out.per_pair.item() == 0.0 and policy.chosen.grad.abs().max() == 0
