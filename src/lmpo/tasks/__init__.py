"""Tasks: prompt sets with default rewards. Importing this package registers every builder in ``TASKS``."""

from __future__ import annotations

from typing import Any

from lmpo.registry import TASKS
from lmpo.tasks import arithmetic, env, local, reasoning_gym, synthetic  # noqa: F401 - imported to register
from lmpo.tasks import guided_copy  # noqa: F401 - imported to register (guidance results, docs/guidance.md)
from lmpo.tasks.arithmetic import ArithmeticTask
from lmpo.tasks.base import Task, columns_of
from lmpo.tasks.env import EnvTask
from lmpo.tasks.local import LocalTask
from lmpo.tasks.reasoning_gym import ReasoningGymTask
from lmpo.tasks.synthetic import CopyTask


def build_task(name: str, **params: Any) -> Task:
    """Build the registered task ``name`` with its parameters (unknown names/keys raise ``ConfigError``)."""
    return TASKS.build(name, where="task", **params).build()


__all__ = [
    "ArithmeticTask",
    "CopyTask",
    "EnvTask",
    "LocalTask",
    "ReasoningGymTask",
    "Task",
    "build_task",
    "columns_of",
]
