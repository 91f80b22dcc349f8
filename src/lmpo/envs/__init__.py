"""Text environments for multi-turn RL: the protocol, the registry ``ENVS`` and the built-in environments.

``build_env(name, **params)`` builds a registered environment (``frozenlake``, ``gymnasium``, ``toolmath``,
``searchqa``, ``copy_turns``, ``tiny_search``, ``countdown``, ``aries_sort``) or a user's own class
given as ``"package.module:Class"`` (constructed with ``params``; it must have ``reset`` and ``step``, see
:class:`lmpo.envs.base.Env`). :class:`ToolEnv` is the base of question-answering environments with tools.
Importing this package registers the built-ins; Gymnasium is imported only when a Gymnasium-backed environment is
built.
"""

from __future__ import annotations

import importlib
from typing import Any

from lmpo.envs import aries_sort, copy_turns, countdown, frozenlake, gym_adapter, searchqa, tiny_search, toolmath  # noqa: F401 - imported to register
from lmpo.envs.base import (
    Env,
    EnvError,
    Episode,
    Step,
    checked_reset,
    checked_step,
    observation_messages,
    run_episode,
)
from lmpo.envs.copy_turns import CopyTurnsEnv
from lmpo.envs.countdown import CountdownEnv
from lmpo.envs.frozenlake import FrozenLakeEnv
from lmpo.envs.gym_adapter import GymnasiumEnv, GymTextEnv, TextCodec, WordCodec
from lmpo.envs.searchqa import SearchQAEnv
from lmpo.envs.toolmath import ToolMathEnv
from lmpo.envs.tool_env import ToolEnv, contains_answer
from lmpo.errors import ConfigError, did_you_mean
from lmpo.registry import ENVS


def import_object(path: str, what: str) -> Any:
    """The object named by ``"package.module:attr"``, with a clear ``ConfigError`` if it cannot be found."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f'Cannot load {what} "{path}": module "{module_name}" could not be imported ({exc}). Use '
            f'"package.module:Name" with the module importable from the current directory or PYTHONPATH.'
        ) from None
    if not attr or not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(
            f'Cannot load {what} "{path}": module "{module_name}" has no attribute "{attr}".'
            f"{did_you_mean(attr, public)}"
        )
    return getattr(module, attr)


def build_env(name: str, **params: Any) -> Env:
    """A registered environment by name, or ``"module:Class"`` constructed with ``params``."""
    if ":" not in name:
        return ENVS.build(name, where="env", **params)
    cls = import_object(name, "environment")
    try:
        env = cls(**params)
    except TypeError as exc:
        raise ConfigError(f'Cannot build environment "{name}" with params {params}: {exc}.') from None
    if not isinstance(env, Env):
        raise ConfigError(
            f'Environment "{name}" built a {type(env).__name__} without reset(seed) and step(action) methods; '
            f"see lmpo.envs.base.Env."
        )
    return env


__all__ = [
    "ENVS",
    "CopyTurnsEnv",
    "CountdownEnv",
    "Env",
    "EnvError",
    "Episode",
    "FrozenLakeEnv",
    "GymTextEnv",
    "GymnasiumEnv",
    "SearchQAEnv",
    "Step",
    "TextCodec",
    "ToolEnv",
    "ToolMathEnv",
    "WordCodec",
    "build_env",
    "checked_reset",
    "checked_step",
    "contains_answer",
    "import_object",
    "observation_messages",
    "run_episode",
]
