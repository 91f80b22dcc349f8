"""APO-zero and APO-down (arXiv:2408.06266, Eqs. 7 and 8) by hand."""

from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_apo_zero_and_down_at_the_reference():
    # at pi = pi_ref every log-ratio is 0: zero: (1 - 1/2) + 1/2 = 1; down: 1/2 + (1 - 1/2) = 1; sigmoid' = 1/4
    for name, g_chosen, g_rejected in (("apo_zero", -0.25, 0.25), ("apo_down", 0.0, 0.25)):
        batch, policy, ref = pair_case([[-1.0, -1.0]], [[-2.0]], [[-1.0, -1.0]], [[-2.0]])
        out = PREFERENCE_LOSSES.build(name, beta=1.0)(batch, policy, ref)
        assert abs(out.per_pair.item() - 1.0) < 1e-12, name
        out.per_pair.sum().backward()
        assert abs(policy.chosen.grad[0, 0].item() - g_chosen) < 1e-12, name
        assert abs(policy.rejected.grad[0, 0].item() - g_rejected) < 1e-12, name


def test_apo_down_lowers_the_chosen_likelihood_apo_zero_raises_it():
    # log-ratios r_w = 0.5, r_l = -0.5: zero still pushes the chosen up; down's gradient on it is
    # s'(0.5) - s'(1) > 0, so it pushes the chosen down
    for name, sign in (("apo_zero", -1), ("apo_down", 1)):
        batch, policy, ref = pair_case([[-0.5]], [[-2.5]], [[-1.0]], [[-2.0]])
        PREFERENCE_LOSSES.build(name, beta=1.0)(batch, policy, ref).per_pair.sum().backward()
        assert sign * policy.chosen.grad.item() > 0, name
