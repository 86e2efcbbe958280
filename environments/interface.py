"""The environment interface: what a multi-turn rollout talks to, and its registry.

An environment answers the model's last turn with messages (tool results, a judge's reply, a
game's next state) or says the episode is done (`respond` returns None). The worker runs it to
build the episode; the trainer runs it again on the model's turns to verify what the worker
claims it answered, so a `deterministic` environment must answer the same conversation the
same way on every machine. Environments are registered by name (`register`); a recipe and the
run spec name one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from swarmrl.base.config import EnvironmentConfig
from swarmrl.base.imports import resolve

ChatMessage = dict[str, Any]  # {"role": ..., "content": ...}, as chat templates take them


class Environment(ABC):
    name: ClassVar[str]

    def __init__(self, config: EnvironmentConfig) -> None:
        self.config = config

    def deterministic(self) -> bool:
        """Whether the same conversation always gets the same answer. The trainer re-runs the
        environment to verify an episode, so a run refuses one that is not."""
        return True

    def tool_schemas(self) -> list[dict[str, Any]]:
        """JSON schemas of the tools, for chat templates that render them (`tools=`)."""
        return []

    def initial_messages(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        """The episode's opening messages, from the task's (system and user) messages."""
        return messages

    @abstractmethod
    def respond(self, conversation: list[ChatMessage]) -> list[ChatMessage] | None:
        """The environment's messages after the model's last turn (the last message of
        `conversation`), or None when the episode is done. Must not raise: a bad move of the
        model becomes a message that says what was wrong."""


ENVIRONMENTS: dict[str, type[Environment]] = {}


def register(cls: type[Environment]) -> type[Environment]:
    """Class decorator: make the environment loadable by its `name`."""
    if cls.name in ENVIRONMENTS:
        raise ValueError(f"environment {cls.name!r} is already registered")
    ENVIRONMENTS[cls.name] = cls
    return cls


def make_environment(config: EnvironmentConfig) -> Environment:
    """The environment a recipe or run spec names, or ValueError saying what is missing."""
    example = "mypkg.envs:MyEnvironment"
    cls = resolve(config.name, ENVIRONMENTS, "environment", example, "Class")
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ValueError(f"environment {config.name!r} is not an Environment subclass")
    return cls(config)
