"""KTO (arXiv:2402.01306, Eq. 8) by hand, with unpaired rows (an absent side has an all-False mask): the reference
point from mismatched pairs (the default, the paper's and TRL's estimator) and from the batch's implied rewards."""

import math

import pytest
import torch

from lmpo.errors import ConfigError, DataError
from lmpo.train.preference import attach_mismatched

from lmpo.batch import PreferenceBatch
from lmpo.methods.base import PairLogps
from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_kto_paired_hand_value_and_gradient():
    # implied rewards r_w = 1, r_l = -1 -> z_0 = max(0, mean(1, -1)) = 0; beta 1:
    # (1 - s(1)) + (1 - s(1)) = 2 s(-1); d/dr_w = -s'(1), d/dr_l = +s'(1)
    batch, policy, ref = pair_case([[0.0]], [[-2.0]], [[-1.0]], [[-1.0]])
    out = PREFERENCE_LOSSES.build("kto", beta=1.0, reference_point="batch")(batch, policy, ref)
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
    out = PREFERENCE_LOSSES.build("kto", beta=1.0, undesirable_weight=2.0, reference_point="batch")(batch, policy, ref)
    sig = torch.sigmoid
    want = torch.tensor([1 - sig(torch.tensor(0.5)).item(), 2 * (1 - sig(torch.tensor(0.5)).item())], dtype=torch.float64)
    assert torch.allclose(out.per_pair, want)
    assert out.metrics["loss/kl"].item() == 1.5 and "rewards/margins" not in out.metrics


def unpaired_case(kl_policy, kl_ref):
    # row 0: desirable only (implied reward 1 - (-1) = 2); row 1: undesirable only (0 - (-1) = 1)
    batch = PreferenceBatch(prompt_ids=torch.ones(2, 1, dtype=torch.long), chosen_ids=torch.ones(2, 1, dtype=torch.long),
                            chosen_mask=torch.tensor([[True], [False]]), rejected_ids=torch.ones(2, 1, dtype=torch.long),
                            rejected_mask=torch.tensor([[False], [True]]),
                            mismatched_logps=torch.tensor(kl_policy, dtype=torch.float64).requires_grad_(),
                            mismatched_ref_logps=torch.tensor(kl_ref, dtype=torch.float64))
    policy = PairLogps(torch.tensor([[1.0], [0.0]], dtype=torch.float64).requires_grad_(),
                       torch.tensor([[0.0], [0.0]], dtype=torch.float64).requires_grad_())
    ref = PairLogps(torch.tensor([[-1.0], [0.0]], dtype=torch.float64), torch.tensor([[0.0], [-1.0]], dtype=torch.float64))
    return batch, policy, ref


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_mismatched_reference_point_value_and_gradient():
    # mismatched log-ratios (-1) - (-2) = 1 and (-2) - (-2.5) = 0.5 -> z_0 = max(0, 0.75) = 0.75; beta 1, lambda_U 2:
    # row 0: 1 - s(2 - 0.75), row 1: 2 (1 - s(0.75 - 1)); d/dr_0 = -s'(1.25), d/dr_1 = 2 s'(-0.25); z_0 gets none
    batch, policy, ref = unpaired_case([-1.0, -2.0], [-2.0, -2.5])
    loss = PREFERENCE_LOSSES.build("kto", beta=1.0, undesirable_weight=2.0)
    assert loss.needs == {"ref_logprobs", "mismatched_logprobs"}
    out = loss(batch, policy, ref)
    assert out.metrics["loss/kl"].item() == 0.75
    torch.testing.assert_close(out.per_pair, torch.tensor([1 - sig(1.25), 2 * (1 - sig(-0.25))], dtype=torch.float64))
    out.per_pair.sum().backward()
    assert abs(policy.chosen.grad[0, 0].item() + sig(1.25) * (1 - sig(1.25))) < 1e-12
    assert abs(policy.rejected.grad[1, 0].item() - 2 * sig(-0.25) * (1 - sig(-0.25))) < 1e-12
    assert policy.chosen.grad[1, 0] == 0 and policy.rejected.grad[0, 0] == 0
    assert batch.mismatched_logps.grad is None  # z_0 is detached


def test_kto_mismatched_reference_point_is_clamped_and_ignores_the_rows_own_rewards():
    # mismatched log-ratios -1 and -2: z_0 = max(0, -1.5) = 0, whatever the rows' implied rewards (2 and 1) are
    batch, policy, ref = unpaired_case([-3.0, -4.0], [-2.0, -2.0])
    out = PREFERENCE_LOSSES.build("kto", beta=1.0)(batch, policy, ref)
    assert out.metrics["loss/kl"].item() == 0.0
    torch.testing.assert_close(out.per_pair, torch.tensor([1 - sig(2.0), 1 - sig(-1.0)], dtype=torch.float64))
    batch_point = PREFERENCE_LOSSES.build("kto", beta=1.0, reference_point="batch")(batch, policy, ref)
    assert batch_point.metrics["loss/kl"].item() == 1.5  # mean of the rows' own rewards: a different estimate


def test_kto_mismatched_without_the_mismatched_logps_is_a_clear_error():
    batch, policy, ref = pair_case([[0.0]], [[-2.0]], [[-1.0]], [[-1.0]])
    with pytest.raises(ConfigError, match="reference_point=batch"):
        PREFERENCE_LOSSES.build("kto")(batch, policy, ref)
    assert PREFERENCE_LOSSES.build("kto", reference_point="batch").needs == {"ref_logprobs"}


def test_attach_mismatched_rotates_responses_by_one():
    a = {"chosen_ids": [1], "rejected_ids": [2]}  # paired
    b = {"chosen_ids": [3], "rejected_ids": []}  # desirable only
    c = {"chosen_ids": [], "rejected_ids": [4]}  # undesirable only
    attach_mismatched([a, b, c])
    # a <- c's only response; b (odd row) <- a's rejected; c (even row) <- b's chosen
    assert (a["mismatched_ids"], b["mismatched_ids"], c["mismatched_ids"]) == ([4], [2], [3])
    with pytest.raises(DataError, match="1 usable example.*reference_point=batch"):
        attach_mismatched([{"chosen_ids": [1], "rejected_ids": [2]}])
