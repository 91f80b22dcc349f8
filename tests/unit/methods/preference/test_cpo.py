"""CPO (arXiv:2401.08417, Eqs. 3-4) by hand."""

import math

from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_cpo_hand_value_and_gradient():
    # summed log-probs: chosen -2 (two tokens), rejected -4 -> beta 0.5 * 2 = 1; NLL = token mean 1
    batch, policy, _ = pair_case([[-1.0, -1.0]], [[-4.0]])
    out = PREFERENCE_LOSSES.build("cpo", beta=0.5, alpha=2.0)(batch, policy, None)
    assert abs(out.per_pair.item() - (math.log1p(math.exp(-1)) + 2.0 * 1.0)) < 1e-12
    out.per_pair.sum().backward()
    s = 1 / (1 + math.e)
    # per chosen token: -beta sigmoid(-1) - alpha / |y_w|
    assert abs(policy.chosen.grad[0, 0].item() - (-0.5 * s - 1.0)) < 1e-12
    assert abs(policy.rejected.grad[0, 0].item() - 0.5 * s) < 1e-12
