"""DPO + NLL (Iterative RPO, arXiv:2404.19733) by hand."""

import math

from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_dpo_nll_hand_value_and_gradient():
    # at pi = pi_ref: DPO ln 2; chosen NLL token mean (1 + 3) / 2 = 2; alpha 0.5 -> ln 2 + 1
    batch, policy, ref = pair_case([[-1.0, -3.0]], [[-2.0]], [[-1.0, -3.0]], [[-2.0]])
    out = PREFERENCE_LOSSES.build("dpo_nll", beta=0.1, alpha=0.5)(batch, policy, ref)
    assert abs(out.per_pair.item() - (math.log(2) + 1.0)) < 1e-12
    out.per_pair.sum().backward()
    # per chosen token: -beta/2 - alpha/2 = -0.05 - 0.25
    assert abs(policy.chosen.grad[0, 0].item() + 0.3) < 1e-12 and abs(policy.rejected.grad.item() - 0.05) < 1e-12
