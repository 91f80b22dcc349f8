"""Tools for multi-turn rollouts: Python functions, their JSON schemas, call parsing, execution, built-ins.

``build_tools(["calculator", "python", "search", "mypkg.tools:lookup"], timeout=10)`` gives a
:class:`ToolSet`; a user's tool is any function with type hints and a Google-style docstring (the same functions
TRL's ``tools=[...]`` takes), given as ``"module:function"`` or passed to :class:`ToolSet` directly. Built-ins:

- ``calculator``: exact arithmetic, parsed with ``ast`` (:mod:`lmpo.tools.calculator`);
- ``python``: a sandboxed subprocess with CPU, memory, output and wall limits, no network
  (:mod:`lmpo.tools.sandbox`);
- ``search``: BM25 over the small corpus lmpo ships (:mod:`lmpo.tools.search`; needs ``bm25s``).
"""

from __future__ import annotations

from typing import Any, Callable

from lmpo.errors import ConfigError, did_you_mean
from lmpo.tools.base import (
    COUNTERS,
    ToolSet,
    ToolTurn,
    assistant_message,
    call_with_timeout,
    template_renders_tools,
    tool_message,
    tool_schema,
    tools_system_prompt,
)
from lmpo.tools.calculator import calculator
from lmpo.tools.parse import InvalidCall, ToolCall, check_arguments, parse_tool_calls
from lmpo.tools.sandbox import Sandbox, SandboxResult, python, sandbox_isolation
from lmpo.tools.search import Corpus, make_search_tool, search

BUILTIN_TOOLS: dict[str, Callable[..., str]] = {"calculator": calculator, "python": python, "search": search}


def resolve_tool(spec: str | Callable) -> Callable:
    """A tool function from a built-in name, a ``"module:function"`` path, or the function itself."""
    if callable(spec):
        return spec
    if ":" in spec:
        from lmpo.envs import import_object  # lazy: envs is optional for tool users

        fn = import_object(spec, "tool")
        if not callable(fn):
            raise ConfigError(f'Tool "{spec}" is a {type(fn).__name__}, not a function.')
        return fn
    if spec not in BUILTIN_TOOLS:
        raise ConfigError(
            f'Unknown tool "{spec}".{did_you_mean(spec, BUILTIN_TOOLS)} Built-in tools: {", ".join(BUILTIN_TOOLS)}; '
            f'or give your own as "package.module:function".'
        )
    return BUILTIN_TOOLS[spec]


def build_tools(specs: list[str | Callable], **kwargs: Any) -> ToolSet:
    """A :class:`ToolSet` of the named tools (``kwargs``: ``timeout``, ``max_result_chars``)."""
    return ToolSet([resolve_tool(s) for s in specs], **kwargs)


__all__ = [
    "BUILTIN_TOOLS",
    "COUNTERS",
    "Corpus",
    "InvalidCall",
    "Sandbox",
    "SandboxResult",
    "ToolCall",
    "ToolSet",
    "ToolTurn",
    "assistant_message",
    "build_tools",
    "calculator",
    "call_with_timeout",
    "check_arguments",
    "make_search_tool",
    "parse_tool_calls",
    "python",
    "resolve_tool",
    "sandbox_isolation",
    "search",
    "template_renders_tools",
    "tool_message",
    "tool_schema",
    "tools_system_prompt",
]
