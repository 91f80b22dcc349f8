"""Declared hyper-parameter ranges, checked in one place.

A component states the valid values of a hyper-parameter next to its default, and the relations between
hyper-parameters as a class attribute; ``Registry.build`` checks both with :func:`check_params`, so every message
names the full config key (``selectors[1].min_n must be >= 1, got 0``) wherever the component sits::

    @dataclass(frozen=True)
    class SPOAdvantage:
        d_half: float = hp(0.06, gt=0)
        rho_min: float = hp(0.875, gt=0, le=1)
        rho_max: float = hp(0.96, gt=0, le=1)
        mode: str = hp("batch", choices=("batch", "tracked"))
        constraints: ClassVar[tuple[Rule, ...]] = (ordered("rho_min", "rho_max"),)

- A bound applies to a set value only: ``None`` (an optional hyper-parameter left unset) always passes.
- A bound on a list or tuple applies to every entry.
- A :class:`Rule` is a predicate over named fields plus a message whose ``{field}`` placeholders become full keys.

Checks that are not about hyper-parameter values (a batch lacking a field at call time) stay in the component.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from lmpo.errors import ConfigError

RANGE_KEY = "lmpo.range"


def _fmt(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else repr(v)


@dataclass(frozen=True)
class Range:
    """The valid values of one hyper-parameter: numeric bounds (any of gt / ge / lt / le) or a set of choices."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple | None = None

    def __post_init__(self) -> None:
        if self.gt is not None and self.ge is not None or self.lt is not None and self.le is not None:
            raise ValueError("give at most one lower bound (gt or ge) and one upper bound (lt or le)")
        if self.choices is not None and self.bounded:
            raise ValueError("give either numeric bounds or choices, not both")
        if self.choices is not None and not self.choices:
            raise ValueError("choices must not be empty")
        lo, hi = self.lower, self.upper
        if lo is not None and hi is not None and not lo[0] <= hi[0]:
            raise ValueError(f"empty range: {self.describe()}")

    @property
    def bounded(self) -> bool:
        return any(b is not None for b in (self.gt, self.ge, self.lt, self.le))

    @property
    def lower(self) -> tuple[float, bool] | None:
        """(bound, inclusive) or None."""
        return (self.gt, False) if self.gt is not None else (self.ge, True) if self.ge is not None else None

    @property
    def upper(self) -> tuple[float, bool] | None:
        return (self.lt, False) if self.lt is not None else (self.le, True) if self.le is not None else None

    def describe(self) -> str:
        """The condition in words: ``> 0``, ``in (0, 1]``, ``one of "a", "b"``."""
        if self.choices is not None:
            return "one of " + ", ".join(_fmt(c) for c in self.choices)
        lo, hi = self.lower, self.upper
        if lo is not None and hi is not None:
            return f"in {'[' if lo[1] else '('}{lo[0]:g}, {hi[0]:g}{']' if hi[1] else ')'}"
        if lo is not None:
            return f"{'>=' if lo[1] else '>'} {lo[0]:g}"
        if hi is not None:
            return f"{'<=' if hi[1] else '<'} {hi[0]:g}"
        return "anything"

    def admits(self, value: Any) -> bool:
        """True when ``value`` (a single value, not a list) is valid; None is always valid."""
        if value is None:
            return True
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        lo, hi = self.lower, self.upper
        if math.isnan(value):
            return False
        if lo is not None and not (value >= lo[0] if lo[1] else value > lo[0]):
            return False
        return hi is None or (value <= hi[0] if hi[1] else value < hi[0])


def hp(default: Any = dataclasses.MISSING, *, gt: float | None = None, ge: float | None = None,
       lt: float | None = None, le: float | None = None, choices: tuple | list | None = None,
       default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a declared range: ``eps: float = hp(1e-6, ge=0)``, ``level: str = hp("token",
    choices=("token", "sequence"))``. Bounds: ``gt`` (>), ``ge`` (>=), ``lt`` (<), ``le`` (<=)."""
    rng = Range(gt=gt, ge=ge, lt=lt, le=le, choices=None if choices is None else tuple(choices))
    return dataclasses.field(default=default, default_factory=default_factory, metadata={RANGE_KEY: rng})


def range_of(f: dataclasses.Field) -> Range | None:
    """The declared range of a dataclass field (None when it has none)."""
    return f.metadata.get(RANGE_KEY)


@dataclass(frozen=True)
class Rule:
    """A constraint between hyper-parameters: ``test(*values of fields)`` must hold.

    ``message`` states the requirement with ``{field}`` placeholders, which :func:`check_params` replaces by the full
    config keys; it appends the offending values.
    """

    test: Callable[..., bool]
    message: str
    fields: tuple[str, ...]


def rule(test: Callable[..., bool], message: str) -> Rule:
    """A :class:`Rule` over the fields named by ``test``'s parameters:
    ``rule(lambda lower, mode: lower is None or mode == "mask", "{lower} needs {mode} = \"mask\"")``."""
    return Rule(test, message, tuple(inspect.signature(test).parameters))


def ordered(low: str, high: str, *, strict: bool = False) -> Rule:
    """``low <= high`` (``<`` when ``strict``); passes when either is None (unset)."""
    if strict:
        return Rule(lambda a, b: a is None or b is None or a < b, f"{{{low}}} must be < {{{high}}}", (low, high))
    return Rule(lambda a, b: a is None or b is None or a <= b, f"{{{low}}} must be <= {{{high}}}", (low, high))


def params_of(obj_cls: Any) -> tuple[dataclasses.Field, ...]:
    """The hyper-parameter fields (init fields) of a dataclass component; () for anything else."""
    if not (isinstance(obj_cls, type) and dataclasses.is_dataclass(obj_cls)):
        return ()
    return tuple(f for f in dataclasses.fields(obj_cls) if f.init)


def _values(obj_cls: Any, given: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Every hyper-parameter's value: ``given`` (keyword arguments, or an instance) over the defaults."""
    out: dict[str, Any] = {}
    for f in params_of(obj_cls):
        if not isinstance(given, Mapping):
            out[f.name] = getattr(given, f.name)
        elif f.name in given:
            out[f.name] = given[f.name]
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def check_params(obj_cls: Any, given: Mapping[str, Any] | Any, where: str = "") -> None:
    """Check declared ranges and :class:`Rule` s of ``obj_cls`` against ``given`` (keyword arguments, merged over
    the defaults, or an instance); raise :class:`ConfigError` naming ``<where>.<field>`` at the first violation.

    Fields are checked in declaration order, then the class's ``constraints`` in order. A non-dataclass (e.g. a
    reward function) has nothing to check.
    """
    values = _values(obj_cls, given)
    key = lambda name: f"{where}.{name}" if where else name  # noqa: E731
    for f in params_of(obj_cls):
        rng = range_of(f)
        if rng is None or f.name not in values:
            continue
        v = values[f.name]
        if isinstance(v, (list, tuple)) and rng.choices is None:
            if not all(rng.admits(x) for x in v):
                raise ConfigError(f"every entry of {key(f.name)} must be {rng.describe()}, got {v!r}.")
        elif not rng.admits(v):
            raise ConfigError(f"{key(f.name)} must be {rng.describe()}, got {_fmt(v)}.")
    names = {f.name for f in params_of(obj_cls)}
    for r in getattr(obj_cls, "constraints", ()):
        unknown = [name for name in r.fields if name not in names]
        if unknown:  # a misspelt field would silently switch the rule off
            raise TypeError(f"{obj_cls.__name__}.constraints names unknown hyper-parameters {unknown}")
        if not all(name in values for name in r.fields):  # a required field not given: the constructor says so
            continue
        if not r.test(*(values[name] for name in r.fields)):
            got = ", ".join(f"{name}={_fmt(values[name])}" for name in r.fields)
            raise ConfigError(r.message.format(**{name: key(name) for name in r.fields}) + f", got {got}.")


def describe_params(obj_cls: Any) -> dict[str, str]:
    """Field name -> its declared range in words, plus ``"constraints"`` (for ``lmpo list``)."""
    out = {}
    for f in params_of(obj_cls):
        if (rng := range_of(f)) is not None:
            each = rng.choices is None and isinstance(f.default, (list, tuple))
            out[f.name] = ("each " if each else "") + rng.describe()
    rules = getattr(obj_cls, "constraints", ())
    if rules:
        out["constraints"] = "; ".join(r.message.format(**{n: n for n in r.fields}) for r in rules)
    return out


def is_regex(pattern: str) -> bool:
    """True when ``pattern`` compiles as a regular expression (for a :func:`rule`)."""
    try:
        re.compile(pattern)
    except (re.error, TypeError):
        return False
    return True
