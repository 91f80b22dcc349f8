"""RPO (arXiv:2405.16436) against the card's worked example and its properties."""

import math

import torch

from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_card_worked_value():
    # margin 0 -> DPO ln 2 = 0.693; eta * beta = 0.1 and log pi(y_w) = -5 -> + 0.5 = 1.193
    batch, policy, ref = pair_case([[-2.0, -3.0]], [[-1.0]], [[-2.0, -3.0]], [[-1.0]])
    out = PREFERENCE_LOSSES.build("rpo", beta=0.1, eta=1.0)(batch, policy, ref)
    assert abs(out.per_pair.item() - (math.log(2) + 0.5)) < 1e-12


def test_eta_zero_is_dpo_and_the_sft_term_adds_minus_eta_beta_to_the_chosen_gradient():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(3, 2, generator=g, dtype=torch.float64) for _ in range(4))
    grads = {}
    for name, kw in (("dpo", {}), ("rpo", {"eta": 0.0}), ("rpo", {"eta": 2.0})):
        batch, policy, ref = pair_case(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())
        out = PREFERENCE_LOSSES.build(name, beta=0.3, **kw)(batch, policy, ref)
        out.per_pair.sum().backward()
        grads[(name, kw.get("eta"))] = (out.per_pair.detach(), policy.chosen.grad, policy.rejected.grad)
    dpo, eta0, eta2 = grads[("dpo", None)], grads[("rpo", 0.0)], grads[("rpo", 2.0)]
    for a, b in zip(dpo, eta0):
        assert torch.allclose(a, b)
    assert torch.allclose(eta2[1], dpo[1] - 2.0 * 0.3)  # the extra -eta*beta on every chosen token
    assert torch.allclose(eta2[2], dpo[2])
