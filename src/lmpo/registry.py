"""Name -> component registries.

A component is a (usually frozen) dataclass whose fields are its hyper-parameters, so each default exists once.
``Registry.build(name, **kwargs)`` rejects unknown names and unknown keys, naming the nearest valid one, and checks
the declared hyper-parameter ranges (:mod:`lmpo.methods.params`) with the full key path (``selectors[1].min_n``).
Each registration records the paper (title, arXiv id) and a fidelity flag that ``lmpo list`` shows.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from lmpo.errors import ConfigError, did_you_mean

T = TypeVar("T")

FIDELITIES = ("exact", "reconstructed")


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    obj: Any
    paper: str
    arxiv: str
    fidelity: str = "exact"

    @property
    def params(self) -> dict[str, Any]:
        """Hyper-parameters and their defaults."""
        if dataclasses.is_dataclass(self.obj):
            out = {}
            for f in dataclasses.fields(self.obj):
                if not f.init:
                    continue
                if f.default is not dataclasses.MISSING:
                    out[f.name] = f.default
                elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                    out[f.name] = f.default_factory()  # type: ignore[misc]
                else:
                    out[f.name] = None
            return out
        sig = inspect.signature(self.obj)
        return {k: (None if p.default is p.empty else p.default) for k, p in sig.parameters.items()}

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.obj) or ""
        return doc.strip().splitlines()[0] if doc else ""


class Registry(Generic[T]):
    """A registry of one component kind (advantage, loss, aggregator, selector, shaper, reward, task, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, paper: str, arxiv: str, fidelity: str = "exact") -> Callable[[T], T]:
        if fidelity not in FIDELITIES:
            raise ValueError(f"fidelity must be one of {FIDELITIES}, got {fidelity!r}")

        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name].obj is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, self.kind, obj, paper, arxiv, fidelity)
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str, *, where: str = "") -> Entry:
        if name not in self._entries:
            loc = f" (at {where})" if where else ""
            raise ConfigError(
                f'Unknown {self.kind} "{name}"{loc}.{did_you_mean(name, self._entries)} '
                f"Valid {self.kind} names: {', '.join(self.names())}. Run `lmpo list` to see them with their papers."
            )
        return self._entries[name]

    def get(self, name: str, *, where: str = "") -> Any:
        return self.entry(name, where=where).obj

    def build(self, name: str, *, where: str = "", **kwargs: Any) -> T:
        """Instantiate ``name`` with hyper-parameters ``kwargs``; unknown keys name the nearest valid key."""
        entry = self.entry(name, where=where)
        valid = entry.params
        for key in kwargs:
            if key not in valid:
                loc = f"{where}." if where else ""
                raise ConfigError(
                    f'Unknown hyper-parameter "{loc}{key}" for {self.kind} "{name}".{did_you_mean(key, valid)} '
                    f"Valid keys: {', '.join(sorted(valid)) or '(none)'}."
                )
        if dataclasses.is_dataclass(entry.obj):
            from lmpo.config import coerce  # lazy: config imports the registries

            hints = typing.get_type_hints(entry.obj)
            prefix = f"{where}." if where else ""
            kwargs = {k: coerce(v, hints[k], f"{prefix}{k}") for k, v in kwargs.items()}
            from lmpo.methods.params import check_params  # lazy, as above

            check_params(entry.obj, kwargs, where)  # declared ranges (hp) and constraints, named by full key
        try:
            return entry.obj(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f'Invalid hyper-parameters for {self.kind} "{name}" {kwargs}: {exc}') from None


ADVANTAGES: Registry = Registry("advantage")
LOSSES: Registry = Registry("loss")
AGGREGATORS: Registry = Registry("aggregator")
SELECTORS: Registry = Registry("selector")
SHAPERS: Registry = Registry("shaper")
PLANNERS: Registry = Registry("planner")  # components that only provide collection extension points
REWARDS: Registry = Registry("reward")
TASKS: Registry = Registry("task")
PREFERENCE_LOSSES: Registry = Registry("preference")  # PreferenceLoss (DPO family); lmpo.methods.preference
ENVS: Registry = Registry("env")  # text environments (lmpo.envs); not yet a config section, so not in ALL_REGISTRIES

ALL_REGISTRIES: dict[str, Registry] = {
    r.kind: r for r in (ADVANTAGES, LOSSES, AGGREGATORS, SELECTORS, SHAPERS, PLANNERS, REWARDS, TASKS,
                        PREFERENCE_LOSSES)
}
