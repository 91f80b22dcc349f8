"""Tool calls in model output: the Hermes/Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` style.

:func:`parse_tool_calls` finds every call in a reply and never raises: each call is either a :class:`ToolCall`
(known tool, arguments that match its JSON schema) or an :class:`InvalidCall` with a ``kind`` (``malformed``,
``unknown_tool``, ``bad_arguments``) and a message written for the model. :func:`check_arguments` is the small
JSON-schema check used for arguments (types, required keys, unknown keys, enums).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
OPEN_TAG = "<tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """A well-formed call of a known tool with schema-valid arguments."""

    name: str
    arguments: dict


@dataclass(frozen=True)
class InvalidCall:
    """A call that cannot run; ``message`` (starting "invalid call:") is what the model is told."""

    kind: str  # malformed | unknown_tool | bad_arguments
    message: str
    name: str | None = None


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


def _type_ok(value: Any, spec: dict) -> bool:
    if value is None and spec.get("nullable"):
        return True
    types = spec.get("type")
    if types is None:
        return True
    for t in types if isinstance(types, list) else [types]:
        py = _JSON_TYPES.get(t)
        if py is None:
            return True  # a type this check does not know: let the function decide
        if isinstance(value, bool) and t in ("integer", "number"):
            continue  # JSON true is not a number
        if isinstance(value, py):
            if t == "array" and "items" in spec:
                return all(_type_ok(v, spec["items"]) for v in value)
            return True
    return False


def check_arguments(arguments: dict, parameters: dict) -> str | None:
    """Why ``arguments`` do not fit the JSON schema ``parameters`` (an ``object`` schema), or ``None``."""
    props = parameters.get("properties", {})
    missing = [k for k in parameters.get("required", []) if k not in arguments]
    if missing:
        return f"missing required argument(s) {', '.join(missing)}"
    for key, value in arguments.items():
        if key not in props:
            return f"unknown argument {key!r} (arguments: {', '.join(props) or 'none'})"
        spec = props[key]
        if not _type_ok(value, spec):
            return f"argument {key!r} must be of type {spec.get('type')}, got {json.dumps(value)[:60]}"
        if "enum" in spec and value not in spec["enum"]:
            return f"argument {key!r} must be one of {spec['enum']}, got {json.dumps(value)[:60]}"
    return None


def _one_call(body: str, schemas: dict[str, dict]) -> ToolCall | InvalidCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        return InvalidCall("malformed", f"invalid call: the text inside <tool_call> is not valid JSON ({exc.msg}).")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return InvalidCall("malformed", 'invalid call: expected {"name": "<tool>", "arguments": {...}}.')
    name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models emit the arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            args = None
    if name not in schemas:
        known = ", ".join(sorted(schemas)) or "none"
        return InvalidCall("unknown_tool", f"invalid call: unknown tool {name!r}; available tools: {known}.", name)
    if not isinstance(args, dict):
        return InvalidCall("malformed", f"invalid call: the arguments of {name!r} must be a JSON object.", name)
    problem = check_arguments(args, schemas[name].get("parameters", {}))
    if problem:
        return InvalidCall("bad_arguments", f"invalid call: {name}: {problem}.", name)
    return ToolCall(name, args)


def parse_tool_calls(text: str, schemas: dict[str, dict]) -> list[ToolCall | InvalidCall]:
    """Every ``<tool_call>`` in ``text``, in order, checked against ``schemas`` (tool name -> function schema,
    the ``"function"`` part of :func:`lmpo.tools.tool_schema`). A final unclosed ``<tool_call>`` is malformed."""
    out: list[ToolCall | InvalidCall] = [_one_call(m.group(1).strip(), schemas) for m in CALL_RE.finditer(text)]
    rest = CALL_RE.sub("", text)
    if OPEN_TAG in rest:
        out.append(InvalidCall("malformed", "invalid call: <tool_call> without a closing </tool_call>."))
    return out
