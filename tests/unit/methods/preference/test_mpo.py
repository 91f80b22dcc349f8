"""MPO (arXiv:2411.10442) by hand: its three terms and their weights."""

import math

from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_mpo_hand_value_at_the_reference():
    # pi = pi_ref: DPO ln 2, BCO 2 ln 2, NLL of the chosen response (token mean) 1.5
    batch, policy, ref = pair_case([[-1.0, -2.0]], [[-2.0]], [[-1.0, -2.0]], [[-2.0]])
    out = PREFERENCE_LOSSES.build("mpo")(batch, policy, ref)
    assert abs(out.per_pair.item() - (0.8 * math.log(2) + 0.2 * 2 * math.log(2) + 1.0 * 1.5)) < 1e-12
    out.per_pair.sum().backward()
    # chosen token: 0.8 * (-beta/2) + 0.2 * (-beta/2) - 1/2 with beta 0.1; rejected: 0.8 * beta/2 + 0.2 * beta/2
    assert abs(policy.chosen.grad[0, 0].item() - (-0.05 - 0.5)) < 1e-12
    assert abs(policy.rejected.grad[0, 0].item() - 0.05) < 1e-12
