"""NCA (arXiv:2402.05369), SPPO hard (arXiv:2405.00675) and EXO (arXiv:2402.00856) pair losses by hand."""

import math

from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def at_reference():
    return pair_case([[-1.0]], [[-2.0]], [[-1.0]], [[-2.0]])


def test_nca_pair_at_the_reference():
    # -ln s(0) - (ln s(0) + ln s(0)) / 2 = 2 ln 2; d/dr_w = -1/2 + 1/4, d/dr_l = 1/4 (times beta)
    batch, policy, ref = at_reference()
    out = PREFERENCE_LOSSES.build("nca_pair", beta=1.0)(batch, policy, ref)
    out.per_pair.sum().backward()
    assert abs(out.per_pair.item() - 2 * math.log(2)) < 1e-12
    assert abs(policy.chosen.grad.item() + 0.25) < 1e-12 and abs(policy.rejected.grad.item() - 0.25) < 1e-12


def test_sppo_hard_targets_plus_minus_half_over_beta():
    batch, policy, ref = at_reference()
    out = PREFERENCE_LOSSES.build("sppo_hard", beta=0.5)(batch, policy, ref)  # (0 - 1)^2 + (0 + 1)^2
    out.per_pair.sum().backward()
    assert abs(out.per_pair.item() - 2.0) < 1e-12
    assert abs(policy.chosen.grad.item() + 2.0) < 1e-12 and abs(policy.rejected.grad.item() - 2.0) < 1e-12
    batch, policy, ref = pair_case([[0.0]], [[-2.0]], [[-1.0]], [[-1.0]])  # log-ratios +1 and -1: the minimum
    assert PREFERENCE_LOSSES.build("sppo_hard", beta=0.5)(batch, policy, ref).per_pair.item() == 0.0


def test_exo_pair_at_the_reference_is_the_kl_of_uniform_to_the_label():
    eps = 0.1
    batch, policy, ref = at_reference()
    out = PREFERENCE_LOSSES.build("exo_pair", beta=1.0, label_smoothing=eps)(batch, policy, ref)
    want = 0.5 * (math.log(0.5) - math.log(1 - eps)) + 0.5 * (math.log(0.5) - math.log(eps))
    assert abs(out.per_pair.item() - want) < 1e-12
    out.per_pair.sum().backward()
    # dL/dh at h = 0: s'(0) [ln s(0) - ln(1-e)] + s(0) * s(-0) ... = 1/4 [ln(1-e)^-1 ... ] -> 1/4 ln(e / (1 - e))
    assert abs(policy.chosen.grad.item() - 0.25 * math.log(eps / (1 - eps))) < 1e-12
