"""DiscoPOP (arXiv:2406.08414, Eq. 5) and AOT (arXiv:2406.05882) by hand."""

import math

import torch
import torch.nn.functional as F

from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_discopop_at_zero_margin_value_and_gradient():
    # l = 0: m = 1/2 -> (1/2) ln 2 + (1/2) e^0; dL/dl = (1/4tau)(1 - ln 2) - 3/4, times beta on the chosen token
    beta, tau = 0.5, 0.05
    batch, policy, ref = pair_case([[-1.0]], [[-2.0]], [[-1.0]], [[-2.0]])
    out = PREFERENCE_LOSSES.build("discopop", beta=beta, tau=tau)(batch, policy, ref)
    assert abs(out.per_pair.item() - 0.5 * (math.log(2) + 1)) < 1e-12
    out.per_pair.sum().backward()
    dl = 0.25 / tau * (1 - math.log(2)) - 0.75
    assert abs(policy.chosen.grad.item() - beta * dl) < 1e-12 and abs(policy.rejected.grad.item() + beta * dl) < 1e-12
    assert dl > 0  # at tau = 0.05 a descent step from the reference lowers the margin (module docstring)


def test_aot_matches_sorted_quantiles_and_reports_them_on_their_rows():
    # policy margins a = [3, 1], reference margins b = [0, 1]: sorted a = [1, 3], sorted b = [0, 1] -> d = [1, 2];
    # rank 0 (a = 1) is row 1, rank 1 (a = 3) is row 0
    batch, policy, ref = pair_case([[3.0], [1.0]], [[0.0], [0.0]], [[0.0], [1.0]], [[0.0], [0.0]])
    out = PREFERENCE_LOSSES.build("aot", beta=1.0)(batch, policy, ref)
    want = -F.logsigmoid(torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert torch.allclose(out.per_pair, want)
    # permuting the rows permutes the losses
    swapped = pair_case([[1.0], [3.0]], [[0.0], [0.0]], [[1.0], [0.0]], [[0.0], [0.0]])
    assert torch.allclose(PREFERENCE_LOSSES.build("aot", beta=1.0)(*swapped).per_pair, want.flip(0))


def test_aot_unpaired_compares_the_sorted_chosen_and_rejected_log_ratios():
    # chosen log-ratios [2, -1], rejected [0, 1] -> sorted [-1, 2] vs [0, 1] -> d = [-1, 1]; row 1 holds rank 0
    batch, policy, ref = pair_case([[2.0], [-1.0]], [[0.0], [1.0]], [[0.0], [0.0]], [[0.0], [0.0]])
    out = PREFERENCE_LOSSES.build("aot", beta=1.0, unpaired=True)(batch, policy, ref)
    assert torch.allclose(out.per_pair, -F.logsigmoid(torch.tensor([1.0, -1.0], dtype=torch.float64)))
