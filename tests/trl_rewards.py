"""A reward function written for TRL, for the test that TRL's datasets drop in."""

from __future__ import annotations

from typing import Any


def solution_match(prompts: list, completions: list, solution: list[str], **kwargs: Any) -> list:
    """1.0 when the completion's last word is the row's `solution` column, as TRL passes it."""
    return [
        1.0 if completion.strip().split()[-1:] == [answer] else 0.0
        for completion, answer in zip(completions, solution, strict=True)
    ]


def reward_len(completions: list, **kwargs: Any) -> list:
    """TRL's quickstart reward: completions close to 20 characters score best."""
    return [-abs(20 - len(completion)) / 20 for completion in completions]
