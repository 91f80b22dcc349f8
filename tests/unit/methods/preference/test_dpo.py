"""DPO (arXiv:2305.18290 Eq. 7) against numbers worked out by hand."""

import math

import torch

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps
from lmpo.registry import PREFERENCE_LOSSES


def _pair_batch():
    # two pairs; the chosen response of pair 0 has 2 tokens, its rejected 1 (padding at the end)
    return PreferenceBatch(
        prompt_ids=torch.ones(2, 3, dtype=torch.long),
        chosen_ids=torch.ones(2, 2, dtype=torch.long),
        chosen_mask=torch.tensor([[True, True], [True, False]]),
        rejected_ids=torch.ones(2, 2, dtype=torch.long),
        rejected_mask=torch.tensor([[True, False], [True, True]]),
    )


def test_dpo_matches_a_hand_computed_loss_and_metrics():
    batch = _pair_batch()
    # padding positions hold junk that the masks must drop
    policy = PairLogps(torch.tensor([[-1.0, -2.0], [-0.5, 9.0]]), torch.tensor([[-3.0, 9.0], [-1.0, -1.0]]))
    ref = PairLogps(torch.tensor([[-1.5, -2.5], [-1.0, 9.0]]), torch.tensor([[-2.0, 9.0], [-0.5, -0.5]]))
    out = PREFERENCE_LOSSES.build("dpo", beta=0.5)(batch, policy, ref)
    # pair 0: chosen log-ratio (-3) - (-4) = 1, rejected (-3) - (-2) = -1 -> h = 0.5 * 2 = 1
    # pair 1: chosen (-0.5) - (-1) = 0.5, rejected (-2) - (-1) = -1 -> h = 0.5 * 1.5 = 0.75
    expect = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(-0.75))]
    assert torch.allclose(out.per_pair, torch.tensor(expect), atol=1e-6)
    assert math.isclose(out.metrics["rewards/chosen"].item(), (0.5 + 0.25) / 2, abs_tol=1e-6)
    assert math.isclose(out.metrics["rewards/rejected"].item(), (-0.5 - 0.5) / 2, abs_tol=1e-6)
    assert math.isclose(out.metrics["rewards/margins"].item(), (1.0 + 0.75) / 2, abs_tol=1e-6)
    assert out.metrics["rewards/accuracies"].item() == 1.0


def test_dpo_gradient_is_beta_sigmoid_of_minus_margin_on_each_token():
    batch = _pair_batch()
    chosen = torch.tensor([[-1.0, -2.0], [-0.5, 9.0]], requires_grad=True)
    rejected = torch.tensor([[-3.0, 9.0], [-1.0, -1.0]], requires_grad=True)
    ref = PairLogps(torch.tensor([[-1.5, -2.5], [-1.0, 9.0]]), torch.tensor([[-2.0, 9.0], [-0.5, -0.5]]))
    out = PREFERENCE_LOSSES.build("dpo", beta=0.5)(batch, PairLogps(chosen, rejected), ref)
    out.per_pair.sum().backward()
    # dL/dlogpi(y_w,t) = -beta * sigmoid(-h) on the chosen tokens, +beta * sigmoid(-h) on the rejected, 0 on padding
    s0, s1 = 0.5 * torch.sigmoid(torch.tensor(-1.0)), 0.5 * torch.sigmoid(torch.tensor(-0.75))
    assert torch.allclose(chosen.grad, torch.tensor([[-s0, -s0], [-s1, 0.0]]), atol=1e-6)
    assert torch.allclose(rejected.grad, torch.tensor([[s0, 0.0], [s1, s1]]), atol=1e-6)


def test_conservative_dpo_mixes_both_label_directions():
    batch = _pair_batch()
    policy = PairLogps(torch.zeros(2, 2), torch.zeros(2, 2))
    ref = PairLogps(torch.zeros(2, 2), torch.full((2, 2), 1.0))
    out = PREFERENCE_LOSSES.build("dpo", beta=1.0, label_smoothing=0.2)(batch, policy, ref)
    # h = 0 - (-len_rejected): pair 0 rejected length 1 -> h = 1; pair 1 -> h = 2
    for h, got in zip((1.0, 2.0), out.per_pair.tolist()):
        want = 0.8 * math.log1p(math.exp(-h)) + 0.2 * math.log1p(math.exp(h))
        assert math.isclose(got, want, abs_tol=1e-6)
