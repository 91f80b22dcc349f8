"""Tools as Python functions, in the ``transformers`` convention.

A tool is a plain function with type hints and a Google-style docstring (an ``Args:`` line per argument), exactly
what TRL's and transformers' ``tools=[...]`` take. :func:`tool_schema` turns it into the JSON schema that
``tokenizer.apply_chat_template(messages, tools=...)`` accepts (through ``transformers.utils.get_json_schema``).

:class:`ToolSet` is what a multi-turn rollout holds: ``schemas`` for the chat template, and :meth:`ToolSet.respond`,
which takes one model reply and returns a :class:`ToolTurn`: the ``tool`` messages to append (one per call, in
order; invalid calls are answered with an "invalid call: ..." message), the parsed calls, and counters. Nothing in
a reply or a tool can raise out of ``respond``: a tool that raises answers "error: ...", one that runs past
``timeout`` answers "error: timed out" (its thread is abandoned; tools that can hang should enforce their own
limits, as the ``python`` sandbox does: its 10 s wall limit is under the default 20 s timeout, so its own message
wins), a result that is not a string is JSON-encoded, long results are cut. ``respond`` is thread-safe as long as the
tools are (the built-ins are), so a batched rollout may answer several episodes at once from a thread pool.

For chat templates that do not render ``tools`` themselves (SmolLM2's, for one), :func:`tools_system_prompt`
writes the schemas and the ``<tool_call>`` format into a system prompt; :func:`template_renders_tools` tells which.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from lmpo.errors import ConfigError
from lmpo.tools.parse import InvalidCall, ToolCall, parse_tool_calls

COUNTERS = ("calls", "valid", "invalid", "malformed", "unknown_tool", "bad_arguments", "errors", "timeouts")


def tool_schema(fn: Callable) -> dict:
    """The ``{"type": "function", "function": {...}}`` schema of ``fn`` for ``apply_chat_template(tools=...)``."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as exc:  # noqa: BLE001 - transformers raises its own exception types
        name = getattr(fn, "__name__", repr(fn))
        raise ConfigError(
            f"Tool {name!r} cannot be described as a JSON schema: {exc}. A tool needs type hints on every argument "
            f"and a docstring with a description and an 'Args:' section naming each argument."
        ) from None


@dataclass
class ToolTurn:
    """The environment side of one turn with tools: messages to append, the calls, and counters."""

    messages: list[dict] = field(default_factory=list)
    calls: list[ToolCall | InvalidCall] = field(default_factory=list)
    metrics: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def call_with_timeout(fn: Callable, kwargs: dict, timeout: float) -> tuple[str, Any]:
    """Run ``fn(**kwargs)`` in a daemon thread for at most ``timeout`` s: ``("ok", result)``,
    ``("error", exception)`` or ``("timeout", None)`` (the thread is abandoned, not killed)."""
    box: list = []

    def target() -> None:
        try:
            box.append(("ok", fn(**kwargs)))
        except BaseException as exc:  # noqa: BLE001 - reported to the model, never raised
            box.append(("error", exc))

    thread = threading.Thread(target=target, daemon=True, name=f"tool-{getattr(fn, '__name__', 'fn')}")
    thread.start()
    thread.join(timeout)
    return box[0] if box else ("timeout", None)


class ToolSet:
    """Named tools, their schemas, and :meth:`respond` (parse, run, format) for model replies."""

    def __init__(
        self,
        tools: list[Callable],
        *,
        timeout: float = 20.0,
        max_result_chars: int = 2000,
        parser: Callable[[str, dict[str, dict]], list[ToolCall | InvalidCall]] = parse_tool_calls,
    ):
        self.functions: dict[str, Callable] = {}
        self.schemas: list[dict] = []
        for fn in tools:
            schema = tool_schema(fn)
            name = schema["function"]["name"]
            if name in self.functions:
                raise ConfigError(f"Two tools are named {name!r}; tool names must be unique.")
            self.functions[name] = fn
            self.schemas.append(schema)
        self._by_name = {s["function"]["name"]: s["function"] for s in self.schemas}
        self.timeout = timeout
        self.max_result_chars = max_result_chars
        self.parser = parser  # (reply, {name: function schema}) -> calls; another chat format plugs in here

    @property
    def names(self) -> list[str]:
        return list(self.functions)

    def parse(self, text: str) -> list[ToolCall | InvalidCall]:
        """The calls in a reply (by default :func:`lmpo.tools.parse.parse_tool_calls`, the Hermes format)."""
        return self.parser(text, self._by_name)

    def run(self, call: ToolCall) -> tuple[str, str]:
        """Run one valid call: ``(status, text)`` with status ``ok``, ``error`` or ``timeout``."""
        status, out = call_with_timeout(self.functions[call.name], call.arguments, self.timeout)
        if status == "timeout":
            return status, f"error: {call.name} timed out after {self.timeout:g} s."
        if status == "error":
            return status, f"error: {call.name} raised {type(out).__name__}: {out}"
        text = _to_text(out)
        if len(text) > self.max_result_chars:
            text = text[: self.max_result_chars] + f"\n[... truncated: {len(text)} characters]"
        return "ok", text

    def respond(self, text: str) -> ToolTurn:
        """Parse every call in a model reply, run the valid ones, answer each with a ``tool`` message."""
        turn = ToolTurn(calls=self.parse(text))
        m = turn.metrics
        for call in turn.calls:
            m["calls"] += 1
            if isinstance(call, InvalidCall):
                m["invalid"] += 1
                m[call.kind] += 1
                turn.messages.append(tool_message(call.name or "invalid", call.message))
                continue
            m["valid"] += 1
            status, result = self.run(call)
            m["errors"] += status == "error"
            m["timeouts"] += status == "timeout"
            turn.messages.append(tool_message(call.name, result))
        return turn


def tool_message(name: str, content: str) -> dict:
    """A ``tool`` chat message (the transformers convention: role, name, content)."""
    return {"role": "tool", "name": name, "content": content}


def assistant_message(text: str, calls: list[ToolCall | InvalidCall]) -> dict:
    """The assistant message for a reply, with its valid calls as ``tool_calls`` (transcripts, dataset export).

    A rollout keeps the reply's generated tokens and does not re-render it: a template that renders ``tool_calls``
    would write the calls a second time after ``content`` (which keeps the reply's text as generated)."""
    msg: dict = {"role": "assistant", "content": text}
    valid = [c for c in calls if isinstance(c, ToolCall)]
    if valid:
        msg["tool_calls"] = [
            {"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in valid
        ]
    return msg


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template uses the ``tools`` argument of ``apply_chat_template``."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates: the default one, or a "tool_use" one
        return "tool_use" in template or "tools" in str(template.get("default", ""))
    return "tools" in template


def tools_system_prompt(schemas: list[dict], preamble: str = "") -> str:
    """A system prompt listing the tools (their JSON schemas) and the ``<tool_call>`` format, Hermes style."""
    listed = "\n".join(json.dumps(s["function"]) for s in schemas)
    return (
        (preamble + "\n\n" if preamble else "")
        + "You can call these tools:\n<tools>\n" + listed + "\n</tools>\n"
        + 'To call a tool, write <tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>. '
        + "The results come back in the next message. When you know the answer, reply without a tool call."
    )
