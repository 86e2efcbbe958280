"""Environments for multi-turn rollouts: the interface and registry, tools, the episode loop.

Importing the package registers the built-in `tools` environment and the built-in tools
(`multiply`, `add`, `python`).
"""

from swarmrl.environments import calculator, python_tool  # noqa: F401  (registers the tools)
from swarmrl.environments.interface import (
    ENVIRONMENTS,
    ChatMessage,
    Environment,
    make_environment,
    register,
)
from swarmrl.environments.tools import TOOLS, ToolEnvironment, tool

__all__ = [
    "ENVIRONMENTS",
    "TOOLS",
    "ChatMessage",
    "Environment",
    "ToolEnvironment",
    "make_environment",
    "register",
    "tool",
]
