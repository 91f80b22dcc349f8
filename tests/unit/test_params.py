"""lmpo.methods.params: declared hyper-parameter ranges (hp), rules between fields, one check with the full key."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import pytest

from lmpo.errors import ConfigError
from lmpo.methods.params import Range, Rule, check_params, describe_params, hp, is_regex, ordered, rule


@dataclass(frozen=True)
class Widget:
    pos: float = hp(1.0, gt=0)
    nonneg: int = hp(0, ge=0)
    below: float = hp(0.5, lt=1)
    at_most: float = hp(1.0, le=1)
    unit: float = hp(0.5, gt=0, le=1)
    opt: float | None = hp(None, ge=1)
    mode: str = hp("a", choices=("a", "b"))
    sizes: tuple[int, ...] = hp((1, 2), gt=0)
    lo: float = 0.0
    hi: float | None = None
    label: str = "x"
    constraints: ClassVar[tuple[Rule, ...]] = (
        ordered("lo", "hi"),
        rule(lambda label, mode: label != "forbidden" or mode == "b", '{label} may be "forbidden" only with {mode}="b"'),
    )


def err(where: str = "w", **kw) -> str:
    with pytest.raises(ConfigError) as exc:
        check_params(Widget, kw, where)
    return str(exc.value)


def test_defaults_pass():
    check_params(Widget, {}, "w")
    check_params(Widget, Widget(), "w")


@pytest.mark.parametrize("key, bad, good, words", [
    ("pos", 0.0, 1e-9, "w.pos must be > 0, got 0.0."),
    ("pos", -1.0, 5.0, "w.pos must be > 0, got -1.0."),
    ("nonneg", -1, 0, "w.nonneg must be >= 0, got -1."),
    ("below", 1.0, 0.999, "w.below must be < 1, got 1.0."),
    ("at_most", 1.5, 1.0, "w.at_most must be <= 1, got 1.5."),
    ("unit", 0.0, 1.0, "w.unit must be in (0, 1], got 0.0."),
    ("unit", 1.01, 1e-3, "w.unit must be in (0, 1], got 1.01."),
    ("opt", 0.5, 1.0, "w.opt must be >= 1, got 0.5."),
    ("mode", "c", "b", 'w.mode must be one of "a", "b", got "c".'),
])
def test_each_bound_kind_rejects_outside_and_accepts_inside(key, bad, good, words):
    assert err(**{key: bad}) == words
    check_params(Widget, {key: good}, "w")


def test_none_passes_a_bound_and_nan_fails_every_bound():
    check_params(Widget, {"opt": None}, "w")
    assert "w.pos must be > 0, got nan" in err(pos=math.nan)
    assert "w.below must be < 1" in err(below=math.nan)


def test_non_numbers_fail_a_numeric_bound():
    assert err(pos="wide") == 'w.pos must be > 0, got "wide".'
    assert "w.pos must be > 0" in err(pos=True)


def test_a_bound_on_a_list_applies_to_every_entry():
    check_params(Widget, {"sizes": [3, 4, 5]}, "w")
    check_params(Widget, {"sizes": ()}, "w")
    assert err(sizes=(1, 0)) == "every entry of w.sizes must be > 0, got (1, 0)."


def test_rules_name_full_keys_and_values_and_skip_unset_fields():
    assert err(lo=2.0, hi=1.0) == "w.lo must be <= w.hi, got lo=2.0, hi=1.0."
    check_params(Widget, {"lo": 2.0, "hi": None}, "w")  # unset hi: the rule does not apply
    check_params(Widget, {"lo": 1.0, "hi": 1.0}, "w")  # not strict
    assert err(label="forbidden") == 'w.label may be "forbidden" only with w.mode="b", got label="forbidden", mode="a".'
    check_params(Widget, {"label": "forbidden", "mode": "b"}, "w")


def test_strict_ordered():
    @dataclass
    class Pair:
        a: float = 0.0
        b: float = 1.0
        constraints: ClassVar[tuple[Rule, ...]] = (ordered("a", "b", strict=True),)

    check_params(Pair, {"a": 0.5}, "")
    with pytest.raises(ConfigError, match=re.escape("a must be < b, got a=1.0, b=1.0.")):
        check_params(Pair, {"a": 1.0}, "")


def test_where_prefixes_every_key_and_empty_where_gives_the_bare_key():
    assert err("selectors[1]", nonneg=-2) == "selectors[1].nonneg must be >= 0, got -2."
    assert err("", nonneg=-2) == "nonneg must be >= 0, got -2."
    assert err("shapers[0]", lo=3.0, hi=2.0).startswith("shapers[0].lo must be <= shapers[0].hi")


def test_fields_are_checked_in_order_before_rules():
    assert err(pos=0.0, nonneg=-1, lo=2.0, hi=1.0).startswith("w.pos ")
    assert err(nonneg=-1, lo=2.0, hi=1.0).startswith("w.nonneg ")


def test_an_instance_is_checked_like_its_arguments():
    with pytest.raises(ConfigError, match=re.escape("loss.pos must be > 0, got -1.0.")):
        check_params(Widget, Widget(pos=-1.0), "loss")  # direct construction does not check; check_params does


def test_anything_but_a_dataclass_has_nothing_to_check():
    check_params(lambda x=-1: x, {"x": -5}, "reward")
    check_params(int, {}, "x")


def test_range_definition_errors():
    with pytest.raises(ValueError, match="at most one lower bound"):
        Range(gt=0, ge=0)
    with pytest.raises(ValueError, match="at most one lower bound"):
        Range(lt=1, le=1)
    with pytest.raises(ValueError, match="either numeric bounds or choices"):
        Range(ge=0, choices=("a",))
    with pytest.raises(ValueError, match="must not be empty"):
        Range(choices=())
    with pytest.raises(ValueError, match="empty range"):
        Range(ge=2, le=1)


def test_describe():
    assert Range(gt=0).describe() == "> 0"
    assert Range(ge=0, lt=1).describe() == "in [0, 1)"
    assert Range(le=0.5).describe() == "<= 0.5"
    assert Range(choices=("x", 1)).describe() == 'one of "x", 1'
    d = describe_params(Widget)
    assert d["unit"] == "in (0, 1]" and d["mode"] == 'one of "a", "b"' and "lo" not in d
    assert d["sizes"] == "each > 0"
    assert d["constraints"].startswith("lo must be <= hi; label may be")


def test_rule_fields_come_from_the_predicate_signature():
    r = rule(lambda a, b: a < b, "{a} < {b}")
    assert r.fields == ("a", "b")


def test_is_regex():
    assert is_regex(r"\d+") and not is_regex("(")


def test_a_rule_naming_an_unknown_field_is_a_definition_error():
    @dataclass
    class Typo:
        rho_min: float = 0.1
        rho_max: float = 0.9
        constraints: ClassVar[tuple[Rule, ...]] = (ordered("rho_min", "rhomax"),)

    with pytest.raises(TypeError, match=r"Typo.constraints names unknown hyper-parameters \['rhomax'\]"):
        check_params(Typo, {}, "advantage")
