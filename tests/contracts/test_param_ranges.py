"""Declared hyper-parameter ranges of every registered component: each bound rejects a value just outside it (with
the full key in the message) and every default is accepted. New components join automatically."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

import lmpo.methods  # noqa: F401  (registers components)
import lmpo.rewards  # noqa: F401
import lmpo.tasks  # noqa: F401
from lmpo.errors import ConfigError
from lmpo.methods.params import check_params, params_of, range_of
from lmpo.registry import ALL_REGISTRIES

WHERE = "slot[3]"  # any key path: the message must carry it, whatever the component's kind

COMPONENTS = [(kind, e.name) for kind, reg in ALL_REGISTRIES.items() for e in reg.entries()
              if isinstance(e.obj, type) and dataclasses.is_dataclass(e.obj)]
BOUNDS = [(kind, name, f.name) for kind, name in COMPONENTS
          for f in params_of(ALL_REGISTRIES[kind].get(name)) if range_of(f) is not None]


def is_int(hint) -> bool:
    """int, int | None, tuple[int, ...], list[int]: a bound on it moves in steps of 1."""
    args = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis] or [hint]
    return all(a is int or is_int(a) for a in args) if typing.get_args(hint) else hint is int


def outside(rng, integer: bool) -> list:
    """Values just outside each side of the range (one step for integers, one ulp for floats)."""
    if rng.choices is not None:
        return [f"{rng.choices[0]}_not_a_choice"]
    out = []
    if rng.lower is not None:
        b, inclusive = rng.lower
        out.append((b - 1 if integer else math.nextafter(b, -math.inf)) if inclusive else b)
    if rng.upper is not None:
        b, inclusive = rng.upper
        out.append((b + 1 if integer else math.nextafter(b, math.inf)) if inclusive else b)
    return out


@pytest.mark.parametrize("kind, name", COMPONENTS)
def test_defaults_are_accepted(kind, name):
    cls = ALL_REGISTRIES[kind].get(name)
    check_params(cls, {}, WHERE)
    required = [f.name for f in params_of(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if not required:  # (a task needs its dataset)
        ALL_REGISTRIES[kind].build(name, where=WHERE)


def test_ranges_are_declared():
    assert len(BOUNDS) > 100  # the method components declare their ranges (issue 15: ~133 hand-written checks)


@pytest.mark.parametrize("kind, name, key", BOUNDS)
def test_every_bound_rejects_a_value_just_outside(kind, name, key):
    reg = ALL_REGISTRIES[kind]
    cls = reg.get(name)
    f = next(f for f in params_of(cls) if f.name == key)
    hint = typing.get_type_hints(cls)[key]
    sequence = typing.get_origin(hint) in (tuple, list)
    bad_values = outside(range_of(f), is_int(hint))
    assert bad_values, f"{name}.{key} declares a range that bounds nothing"
    for bad in bad_values:
        value = (bad,) if sequence else bad
        with pytest.raises(ConfigError) as exc:
            reg.build(name, where=WHERE, **{key: value})
        msg = str(exc.value)
        assert f"{WHERE}.{key} must be" in msg, msg
        assert repr(bad) in msg or f'"{bad}"' in msg, msg
