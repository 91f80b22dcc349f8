"""Weighted sets of reward functions and the checks that turn reward bugs into readable errors."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lmpo.errors import ConfigError, DataError, RewardError, did_you_mean
from lmpo.registry import REWARDS

RewardFn = Callable[..., list[float]]


@dataclass
class RewardSpec:
    """One reward function in a set: a registered name or a ``"module.sub:function"`` path, its weight and kwargs."""

    name: str
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def coerce(cls, spec: Any, *, where: str = "rewards") -> RewardSpec:
        """Accept a ``RewardSpec``, a bare name, or a config mapping ``{name, weight, kwargs}``."""
        if isinstance(spec, RewardSpec):
            return spec
        if isinstance(spec, str):
            return cls(spec)
        if isinstance(spec, dict):
            valid = [f.name for f in dataclasses.fields(cls)]
            for key in spec:
                if key not in valid:
                    raise ConfigError(
                        f'Unknown key "{key}" in reward spec {spec} at {where}.{did_you_mean(str(key), valid)} '
                        f"Valid keys: {', '.join(valid)}."
                    )
            if "name" not in spec:
                raise ConfigError(f'Reward spec {spec} at {where} has no "name" (a reward name or "module:function").')
            return cls(spec["name"], float(spec.get("weight", 1.0)), dict(spec.get("kwargs") or {}))
        raise ConfigError(f"Reward spec at {where} must be a name or a mapping with a name, got {spec!r}.")


def import_user_module(name: str):
    """Import a user's module (a reward ``"module:function"``) from ``sys.path`` or, after it, the current folder.

    The current folder is searched however lmpo was started: ``python -m lmpo.cli`` puts it on ``sys.path`` but the
    ``lmpo`` console script does not, so without this a reward module next to the config would load for
    ``lmpo compare`` (whose runs are ``python -m`` subprocesses) and not for ``lmpo train``.
    """
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)
    importlib.invalidate_caches()
    return importlib.import_module(name)


def _import_path(path: str, kwargs: dict) -> RewardFn:
    module_name, _, attr = path.partition(":")
    try:
        module = import_user_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f'Cannot load reward "{path}": module "{module_name}" could not be imported ({exc}). lmpo looks for '
            f"it on PYTHONPATH and in the current folder ({os.getcwd()}): write \"package.module:function\" with "
            "the module's file there (package/module.py)."
        ) from None
    except Exception as exc:  # noqa: BLE001 - a bug in the user's module (SyntaxError, NameError, ...) at import
        where = f" ({exc.filename}, line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise ConfigError(
            f'Cannot load reward "{path}": importing module "{module_name}" raised {type(exc).__name__}: '
            f"{exc}{where}. Fix the module (run `python -c \"import {module_name}\"` to see the full error)."
        ) from None
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(
            f'Cannot load reward "{path}": module "{module_name}" ({getattr(module, "__file__", "?")}) has no '
            f'attribute "{attr}".{did_you_mean(attr, public)}'
        )
    obj = getattr(module, attr)
    if isinstance(obj, type):  # a class: instantiate it with the spec's kwargs (dataclass rewards)
        try:
            obj = obj(**kwargs)
        except TypeError as exc:
            raise ConfigError(f'Cannot build reward "{path}" with kwargs {kwargs}: {exc}.') from None
    elif kwargs:
        obj = functools.partial(obj, **kwargs)
    if not callable(obj):
        raise ConfigError(
            f'Reward "{path}" is a {type(obj).__name__}, not a callable; it must be a function '
            f"fn(prompts, completions, **columns) -> list[float]."
        )
    return obj


def resolve_reward(name: str, kwargs: dict | None = None, *, where: str = "rewards") -> RewardFn:
    """Turn a registered reward name or a ``"module.sub:function"`` path into a callable."""
    kwargs = dict(kwargs or {})
    if ":" in name:
        return _import_path(name, kwargs)
    obj = REWARDS.get(name, where=where)
    if dataclasses.is_dataclass(obj):
        return REWARDS.build(name, where=where, **kwargs)
    if kwargs:
        raise ConfigError(f'Reward "{name}" (at {where}) takes no hyper-parameters, got {kwargs}.')
    return obj


def _clip(x: Any, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


class RewardSet:
    """Several reward functions scored on a batch and summed with weights.

    Each function is called once per batch as ``fn(prompts=..., completions=..., **columns)`` (keywords, as TRL
    does). A crash, a wrong length, or a ``None``/non-numeric/non-finite value raises :class:`RewardError`.
    """

    def __init__(self, names: list[str], fns: list[RewardFn], weights: list[float]):
        if not fns:
            raise ConfigError("A reward set needs at least one reward function; got an empty list of rewards.")
        self.names, self.fns, self.weights = list(names), list(fns), [float(w) for w in weights]

    @classmethod
    def from_specs(cls, specs: list[Any], *, where: str = "rewards") -> RewardSet:
        """Build from ``RewardSpec``s (or names / mappings); a repeated name is shown as ``name_2``, ``name_3``..."""
        specs = [RewardSpec.coerce(s, where=f"{where}[{i}]") for i, s in enumerate(specs)]
        names: list[str] = []
        for s in specs:
            base, k = s.name, 2
            name = base
            while name in names:
                name, k = f"{base}_{k}", k + 1
            names.append(name)
        fns = [resolve_reward(s.name, s.kwargs, where=f"{where}[{i}]") for i, s in enumerate(specs)]
        for i, s in enumerate(specs):
            if not math.isfinite(s.weight):
                raise ConfigError(f'Reward "{s.name}" at {where}[{i}] has a non-finite weight {s.weight}.')
        return cls(names, fns, [s.weight for s in specs])

    def __call__(
        self, prompts: list, completions: list[str], columns: dict[str, list]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a batch: returns the (B,) weighted sum and the (B, K) per-function components, float32."""
        b = len(completions)
        if len(prompts) != b:
            raise DataError(f"Reward batch has {len(prompts)} prompts but {b} completions; they must align.")
        for key, col in columns.items():
            if key in ("prompts", "completions"):
                raise DataError(f'Column "{key}" clashes with the reward-function argument "{key}"; rename the column.')
            if len(col) != b:
                raise DataError(f'Reward column "{key}" has {len(col)} values but the batch has {b} completions.')
        comps = torch.zeros(b, len(self.fns), dtype=torch.float32)
        for k, (name, fn) in enumerate(zip(self.names, self.fns)):
            comps[:, k] = torch.tensor(self._score(name, fn, prompts, completions, columns), dtype=torch.float32)
        total = comps @ torch.tensor(self.weights, dtype=torch.float32)
        return total, comps

    def pop_metrics(self) -> dict[str, float]:
        """What scorers counted since the last call (``reward/<name>/failures``, ``.../timeouts``...): each reward
        function with a ``pop_metrics()`` method (the learned scorers, lmpo.rewards.scorer_base) reports here."""
        out: dict[str, float] = {}
        for name, fn in zip(self.names, self.fns):
            pop = getattr(fn, "pop_metrics", None)
            if callable(pop):
                out.update({f"reward/{name}/{k}": float(v) for k, v in pop().items()})
        return out

    def stateful(self) -> dict[str, Any]:
        """Checkpoint entry ``reward:<name>`` -> each reward function with state (``state_dict`` and
        ``load_state_dict``, e.g. ``mpo_judge``'s rubric): saved with the run and restored on ``--resume``."""
        return {f"reward:{n}": fn for n, fn in zip(self.names, self.fns)
                if callable(getattr(fn, "state_dict", None)) and callable(getattr(fn, "load_state_dict", None))}

    def after_step(self, prompts: list, completions: list[str], components: torch.Tensor | None) -> None:
        """Once per training step, after collection: each reward function with an ``after_step(prompts,
        completions, scores)`` method sees the step's samples and its own scores of them (e.g. ``mpo_judge``
        rewrites its rubric every k steps)."""
        for k, fn in enumerate(self.fns):
            hook = getattr(fn, "after_step", None)
            if callable(hook) and components is not None:
                hook(list(prompts), list(completions), components[:, k].tolist())

    def _score(self, name: str, fn: RewardFn, prompts: list, completions: list[str], columns: dict) -> list[float]:
        b = len(completions)
        try:
            out = fn(prompts=prompts, completions=completions, **columns)
        except Exception as exc:  # any user bug becomes one readable error
            raise self._crash_error(name, fn, prompts, completions, columns, exc) from exc
        if isinstance(out, torch.Tensor) or type(out).__module__ == "numpy":
            out = out.tolist()  # tensors and arrays are fine as long as they hold B numbers
        expected = f"a list of {b} floats, one per completion"
        if not isinstance(out, (list, tuple)):
            raise RewardError(
                f'Reward function "{name}" returned {_clip(out)} ({type(out).__name__}); expected {expected}.'
            )
        if len(out) != b:
            raise RewardError(
                f'Reward function "{name}" returned {len(out)} values for a batch of {b} completions; expected '
                f"{expected}. Returned: {_clip(out)}"
            )
        for i, v in enumerate(out):
            if v is None:
                raise RewardError(
                    f'Reward function "{name}" returned None for sample {i} (prompt {_clip(prompts[i])}); expected '
                    f"{expected}. lmpo needs a number for every sample: return 0.0 where the reward does not apply."
                )
            if isinstance(v, str) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
                raise RewardError(
                    f'Reward function "{name}" returned {_clip(v)} ({type(v).__name__}) for sample {i}; '
                    f"expected {expected}."
                )
            if not math.isfinite(float(v)):
                raise RewardError(
                    f'Reward function "{name}" returned the non-finite value {float(v)} for sample {i} (completion '
                    f"{_clip(completions[i])}); expected {expected}, each finite."
                )
        return [float(v) for v in out]

    @staticmethod
    def _crash_error(name, fn, prompts, completions, columns, exc: Exception) -> RewardError:
        # Re-run sample by sample so the message can point at the offending row instead of the whole batch.
        for i in range(len(completions)):
            try:
                fn(prompts=[prompts[i]], completions=[completions[i]], **{k: [v[i]] for k, v in columns.items()})
            except Exception as one:  # noqa: BLE001
                return RewardError(
                    f'Reward function "{name}" raised {type(one).__name__}: {one} on sample {i} (prompt '
                    f"{_clip(prompts[i])}, completion {_clip(completions[i])}). Columns passed: "
                    f"{', '.join(sorted(columns)) or '(none)'}."
                )
        return RewardError(
            f'Reward function "{name}" raised {type(exc).__name__}: {exc} on the batch of {len(completions)}, but '
            f"no single sample reproduces it (it may depend on the batch size or on state between calls)."
        )
