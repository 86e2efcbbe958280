"""Reward functions by name: the `register` decorator, `REWARD_FUNCTIONS`, `load_reward_function`.

A reward function has TRL's signature, so TRL reward functions drop in:
`f(prompts: list[str], completions: list[str], **columns) -> list[float | None]`, where
`columns` holds the dataset's per-sample lists (e.g. `answer`) plus `completion_ids`. It must
accept and ignore columns it does not use; `None` means "not applicable to this sample".
In a multi-turn run each completion is the episode's conversation after the prompt (TRL's
conversational format: a list of {"role", "content"} messages, tool results included); the
built-in rewards judge its last assistant message (`completion_text`).

A recipe names a function either by its registered name (`math_accuracy`) or by an import
path (`mypkg.rewards:my_reward`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from swarmrl.base.imports import resolve

RewardFunction = Callable[..., list[float | None]]

REWARD_FUNCTIONS: dict[str, RewardFunction] = {}


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """A completion's text: itself, or a conversation's last assistant message."""
    if isinstance(completion, str):
        return completion
    said = [m.get("content") or "" for m in completion if m.get("role") == "assistant"]
    return said[-1] if said else ""


def register(name: str) -> Callable[[RewardFunction], RewardFunction]:
    """Decorator: make the function loadable as `name`."""

    def decorator(function: RewardFunction) -> RewardFunction:
        if name in REWARD_FUNCTIONS:
            raise ValueError(f"reward function {name!r} is already registered")
        REWARD_FUNCTIONS[name] = function
        return function

    return decorator


def load_reward_function(spec: str) -> RewardFunction:
    """The function a recipe names: a registered name or `package.module:function`."""
    function = resolve(
        spec, REWARD_FUNCTIONS, "reward function", "mypkg.rewards:my_reward", "function"
    )
    if not callable(function):
        raise ValueError(f"reward function {spec!r} is a {type(function).__name__}, not callable")
    return function
