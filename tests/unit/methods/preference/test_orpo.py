"""ORPO (arXiv:2403.07691, Eqs. 6-7) by hand."""

import math

from lmpo.registry import PREFERENCE_LOSSES

from factories import pair_case


def test_orpo_hand_value():
    # mean log-probs: chosen log 0.5 (odds 1, log odds 0), rejected log 0.25 (odds 1/3): log odds ratio ln 3,
    # L_OR = -log sigmoid(ln 3) = -ln(3/4); L_SFT = -log 0.5 = ln 2
    lc, lr = math.log(0.5), math.log(0.25)
    batch, policy, _ = pair_case([[lc, lc]], [[lr]])
    out = PREFERENCE_LOSSES.build("orpo", beta=0.2)(batch, policy, None)
    assert abs(out.per_pair.item() - (math.log(2) - 0.2 * math.log(0.75))) < 1e-12
    out.per_pair.sum().backward()
    # d/d(mean chosen logp) of -lambda log sigmoid(z): -lambda sigmoid(-z) dz/dc, dz/dc = 1 + p/(1-p) = 2 at p = 1/2;
    # SFT: -1; each of the two tokens gets half
    d_c = -1 - 0.2 * 0.25 * 2
    assert abs(policy.chosen.grad[0, 0].item() - d_c / 2) < 1e-12
    # dz/dr = -(1 + p/(1-p)) = -4/3 at p = 1/4
    assert abs(policy.rejected.grad[0, 0].item() - (0.2 * 0.25 * 4 / 3)) < 1e-12


def test_orpo_stays_finite_when_the_model_is_certain():
    batch, policy, _ = pair_case([[0.0]], [[-1e-9]])
    out = PREFERENCE_LOSSES.build("orpo")(batch, policy, None)
    out.per_pair.sum().backward()
    assert out.per_pair.isfinite().all() and policy.chosen.grad.isfinite().all()
