"""Method components. Importing this package registers every component.

Every module under ``lmpo/methods/<kind>/`` is imported (one paper, one file; adding a file is all it takes to
add a method). A module may define ``PRESETS = {"name": {...partial config...}}``: those presets are merged into
:data:`lmpo.methods.presets.PRESETS`, so a method's paper defaults live next to its equations. Two modules that
define the same preset name are an error, never a silent override.
"""

from __future__ import annotations

import importlib
import pkgutil

from lmpo.methods import aggregate
from lmpo.methods.presets import PRESETS

_KINDS = ("advantage", "loss", "select", "shape", "plan", "credit", "preference")


def _discover() -> tuple:
    modules = [aggregate]
    for kind in _KINDS:
        try:
            pkg = importlib.import_module(f"lmpo.methods.{kind}")
        except ModuleNotFoundError:
            continue
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
            modules.append(mod)
            for name, preset in getattr(mod, "PRESETS", {}).items():
                if name in PRESETS and PRESETS[name] is not preset:
                    raise RuntimeError(f"preset {name!r} of {mod.__name__} is already defined elsewhere")
                PRESETS[name] = preset
    import lmpo.rewards as rewards  # reward modules may define presets too (mpo_judge); they are not MODULES

    for info in sorted(pkgutil.iter_modules(rewards.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"lmpo.rewards.{info.name}")
        for name, preset in getattr(mod, "PRESETS", {}).items():
            if name in PRESETS and PRESETS[name] is not preset:
                raise RuntimeError(f"preset {name!r} of {mod.__name__} is already defined elsewhere")
            PRESETS[name] = preset
    return tuple(modules)


# Modules that must register at least one component (checked by tests/contracts/test_registry.py).
MODULES = _discover()
