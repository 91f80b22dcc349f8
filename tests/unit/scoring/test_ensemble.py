"""rm_ensemble (Coste et al., arXiv:2310.02743): mean / WCO / UWO by hand, the card's properties, a loop reference,
members of any kind, failures. A reward has no gradient of its own: the policy's gradient flows through the
advantage, covered by the contracts of the advantage and loss it feeds."""

from __future__ import annotations

import statistics

import pytest
import torch

from lmpo.errors import ConfigError, RewardError
from lmpo.registry import REWARDS
from lmpo.rewards.ensemble import combine

M = "unit.scoring.stubs:"


def build(**kw):
    return REWARDS.build("rm_ensemble", where="rewards[0]", **kw)


def test_card_worked_example():
    # scores [1.0, 0.0, 0.5]: mean 0.5; WCO 0.0; population variance ((0.5)^2 + (0.5)^2 + 0) / 3 = 1/6 -> UWO(1) =
    # 0.5 - 1/6 = 1/3; unbiased variance 0.5 / 2 = 0.25 -> UWO(1) = 0.25
    s = torch.tensor([[1.0, 0.0, 0.5]], dtype=torch.float64)
    assert combine(s, "mean").item() == pytest.approx(0.5)
    assert combine(s, "wco").item() == 0.0
    assert combine(s, "uwo", 1.0, "population").item() == pytest.approx(1 / 3)
    assert combine(s, "uwo", 1.0, "unbiased").item() == pytest.approx(0.25)
    assert combine(s, "uwo", 2.0, "unbiased").item() == pytest.approx(0.0)


def test_identical_members_make_all_objectives_equal():
    s = torch.tensor([[0.3] * 5, [-2.0] * 5], dtype=torch.float64)
    for how in ("mean", "wco", "uwo"):
        assert combine(s, how).tolist() == pytest.approx([0.3, -2.0])


def test_against_a_loop_reference_and_ordering():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 4, generator=g, dtype=torch.float64)
    for row, m, w, u in zip(s.tolist(), combine(s, "mean"), combine(s, "wco"), combine(s, "uwo", 0.7)):
        assert m.item() == pytest.approx(statistics.fmean(row))
        assert w.item() == min(row)
        assert u.item() == pytest.approx(statistics.fmean(row) - 0.7 * statistics.variance(row))
        assert w <= m and u <= m  # both objectives are pessimistic
    assert torch.equal(combine(s, "uwo", 0.0), combine(s, "mean"))


def test_members_of_any_kind_and_logged_disagreement():
    e = build(members=[M + "length_score", M + "first_digit"], combine="wco")
    # "12": length 2, first digit 1 -> min 1; "7": 1 and 7 -> 1; "": 0 and 0 -> 0
    assert e(["p"] * 3, ["12", "7", ""]) == [1.0, 1.0, 0.0]
    m = e.pop_metrics()  # unbiased variances per sample: 0.5, 18, 0 -> mean 6.1666...
    assert m["variance"] == pytest.approx((0.5 + 18 + 0) / 3)
    e2 = build(members=[{"name": "reward_model", "path": "tiny:1"}, {"name": "reward_model", "path": "tiny:2"}],
               combine="mean")
    one = [REWARDS.build("reward_model", where="x", path=f"tiny:{k}")(["1="], ["1"])[0] for k in (1, 2)]
    assert e2(["1="], ["1"]) == pytest.approx([sum(one) / 2])


def test_a_member_nan_is_masked_and_counted():
    e = build(members=[M + "length_score", M + "nan_on_empty"], combine="mean")
    assert e(["p", "p"], ["ab", ""]) == [1.5, 1.5]  # the failed sample gets its group's mean
    assert e.pop_metrics()["failures"] == 1.0
    with pytest.raises(RewardError):
        build(members=[M + "length_score", M + "nan_on_empty"], on_failure="error")(["p"], [""])


@pytest.mark.parametrize("kw, msg", [
    ({"members": [M + "length_score"]}, "at least 2"),
    ({"members": [M + "length_score", "no_such_reward"]}, "members\\[1\\]"),
    ({"members": [M + "length_score", M + "first_digit"], "combine": "max"}, "combine"),
])
def test_bad_configs(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        build(**kw)
