"""BCO pair loss (arXiv:2404.04656) by hand."""

import math

from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_bco_pair_hand_value_and_gradient():
    # chosen log-ratio 2 (beta 0.5 -> r_w = 1), rejected -2 (r_l = -1): 2 * log(1 + e^-1)
    batch, policy, ref = pair_case([[0.0]], [[-2.0]], [[-2.0]], [[0.0]])
    out = PREFERENCE_LOSSES.build("bco_pair", beta=0.5)(batch, policy, ref)
    assert abs(out.per_pair.item() - 2 * math.log1p(math.exp(-1))) < 1e-12
    out.per_pair.sum().backward()
    s = 1 / (1 + math.e)  # sigmoid(-1)
    assert abs(policy.chosen.grad.item() + 0.5 * s) < 1e-12 and abs(policy.rejected.grad.item() - 0.5 * s) < 1e-12
    # the shift delta moves the decision boundary: r_w = delta and r_l = delta give 2 ln 2
    out = PREFERENCE_LOSSES.build("bco_pair", beta=0.5, delta=1.0)(*pair_case([[0.0]], [[0.0]], [[-2.0]], [[-2.0]]))
    assert abs(out.per_pair.item() - 2 * math.log(2)) < 1e-12
