"""Tools: plain Python functions the model calls, the call format it writes, and the
environment that runs them.

A tool is a function with type hints and a Google-style docstring, marked with `@tool` (the
mark is what lets a run name it: a trainer cannot make a worker call `os.system`). Its JSON
schema comes from transformers' `get_json_schema`, as chat templates take it. The model calls
tools the Hermes way (Qwen, SmolLM3, Hermes): `<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`, any number per turn. The arguments are checked against the type hints
(pydantic's `validate_call`); a malformed call, an unknown tool, bad arguments, a tool that
raises or runs past `tool_timeout_s` all answer with an error message, never a crash. Output is
cut at `max_tool_output_chars`; an error answer is short. Results are cached by (tool,
arguments): the trainer re-runs the same calls for every sample of a group.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from swarmrl.base.config import EnvironmentConfig
from swarmrl.base.imports import resolve
from swarmrl.environments.interface import ChatMessage, Environment, register

TOOLS: dict[str, Callable[..., Any]] = {}
CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
CACHE_SIZE = 4096
ERROR_CHARS = 300  # of an exception's message in an error answer (not cut by the output limit)
# Tool calls run here, so a tool that hangs past its timeout holds a thread, not the rollout.
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tool")


def tool(function: Callable[..., Any] | None = None, *, deterministic: bool = True) -> Any:
    """Mark a function as a tool (`@tool`, or `@tool(deterministic=False)` for a clock or the
    network) and register it by its name."""

    def mark(f: Callable[..., Any]) -> Callable[..., Any]:
        f.__swarmrl_tool__ = {"deterministic": deterministic}  # type: ignore[attr-defined]
        TOOLS.setdefault(f.__name__, f)
        return f

    return mark(function) if function is not None else mark


def load_tool(spec: str) -> Callable[..., Any]:
    """A registered tool name or `package.module:function` (which must be marked `@tool`)."""
    function = resolve(spec, TOOLS, "tool", "mypkg.tools:search", "function")
    if not callable(function) or not hasattr(function, "__swarmrl_tool__"):
        raise ValueError(f"tool {spec!r} is not marked with @swarmrl.environments.tool")
    return function


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def parse_tool_calls(text: str) -> list[ToolCall | str]:
    """The calls in a model turn, in order; a call that cannot be read is its error text."""
    calls: list[ToolCall | str] = []
    for body in CALL.findall(text):
        try:
            value = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(f"error: the tool call is not valid JSON ({e.msg})")
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            calls.append('error: a tool call is {"name": ..., "arguments": {...}}')
            continue
        arguments = value.get("arguments", {})
        if not isinstance(arguments, dict):
            calls.append("error: the tool call's arguments must be an object")
            continue
        calls.append(ToolCall(value["name"], arguments))
    if not calls and "<tool_call>" in text:
        calls.append("error: <tool_call> was not closed with </tool_call>")
    return calls


def format_output(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > limit:
        return f"{text[:limit]}... [{len(text) - limit} more characters cut]"
    return text


class ToolEnvironment(Environment):
    """The model calls the recipe's tools; the episode ends at a turn without a tool call."""

    name = "tools"

    def __init__(self, config: EnvironmentConfig) -> None:
        super().__init__(config)
        self.tools = {}
        for spec in config.tools:
            function = load_tool(spec)
            self.tools[function.__name__] = function
        self._cache: OrderedDict[str, str] = OrderedDict()

    def deterministic(self) -> bool:
        return all(f.__swarmrl_tool__["deterministic"] for f in self.tools.values())

    def tool_schemas(self) -> list[dict[str, Any]]:
        from transformers.utils import get_json_schema

        return [get_json_schema(f) for f in self.tools.values()]

    def respond(self, conversation: list[ChatMessage]) -> list[ChatMessage] | None:
        calls = parse_tool_calls(conversation[-1]["content"])
        if not calls:
            return None
        return [{"role": "tool", "content": self.call(c)} for c in calls]

    def call(self, call: ToolCall | str) -> str:
        """One call's result text (an error text for a call that failed), cached."""
        if isinstance(call, str):
            return call
        key = json.dumps([call.name, call.arguments], sort_keys=True)
        if key not in self._cache:
            self._cache[key] = self._run(call)
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return self._cache[key]

    def _run(self, call: ToolCall) -> str:
        from pydantic import ValidationError, validate_call

        function = self.tools.get(call.name)
        if function is None:
            return f"error: unknown tool {call.name!r}; tools: {', '.join(self.tools)}"
        limit, timeout = self.config.max_tool_output_chars, self.config.tool_timeout_s
        future = _POOL.submit(validate_call(function), **call.arguments)
        try:
            return format_output(future.result(timeout=timeout), limit)
        except FutureTimeout:
            return f"error: {call.name} ran past {timeout:g} s"
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors())
            return f"error: bad arguments for {call.name}: {problems[:ERROR_CHARS]}"
        except Exception as e:
            return f"error: {call.name} raised {type(e).__name__}: {str(e)[:ERROR_CHARS]}"


register(ToolEnvironment)
