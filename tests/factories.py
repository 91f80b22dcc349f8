"""Shared test factories: build components as a config does, and make RolloutBatches (exposed by conftest.py)."""

from __future__ import annotations

from typing import Any

import lmpo.methods  # noqa: F401  (registers components)
from lmpo.registry import ALL_REGISTRIES

# The config key a component of each kind sits under in a run config (list kinds: the first entry).
CONFIG_KEY = {"advantage": "advantage", "loss": "loss", "aggregator": "aggregator", "selector": "selectors[0]",
              "shaper": "shapers[0]", "reward": "rewards[0]", "task": "task"}


def from_config(cls: type, *, where: str | None = None, **kwargs: Any) -> Any:
    """Build the registered component class ``cls`` through its registry, as a config does (types coerced, declared
    ranges checked, errors naming ``where.<key>``); ``where`` defaults to the kind's config key (``loss``,
    ``selectors[0]``, ...)."""
    for kind, reg in ALL_REGISTRIES.items():
        for e in reg.entries():
            if e.obj is cls:
                return reg.build(e.name, where=CONFIG_KEY[kind] if where is None else where, **kwargs)
    raise LookupError(f"{cls.__name__} is not a registered component")
