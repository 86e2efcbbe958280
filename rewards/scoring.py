"""Scoring a batch of completions with several weighted reward functions.

Each function's rewards are kept apart (`per_function`, for logs) and summed with their weights
into `total`, skipping `None` (not applicable) like TRL's nansum: a sample no function applies
to gets 0.0. A function that raises or returns something unusable scores `None` for the whole
batch; the error is logged and kept in `errors`, and the run goes on with the other functions.
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Scores:
    total: list[float]
    per_function: dict[str, list[float | None]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def check_rewards(rewards: Any, size: int) -> list[float | None]:
    """The rewards as floats (NaN and inf as None), or ValueError when they cannot be used."""
    try:
        rewards = list(rewards)
    except TypeError:
        raise ValueError(f"returned a {type(rewards).__name__}, not a list of rewards") from None
    if len(rewards) != size:
        raise ValueError(f"returned {len(rewards)} rewards for {size} completions")
    checked: list[float | None] = []
    for value in rewards:
        if value is not None and not isinstance(value, Real):
            raise ValueError(f"returned a {type(value).__name__}, not a number or None")
        checked.append(None if value is None or not math.isfinite(value) else float(value))
    return checked


def score_completions(
    functions: list[tuple[str, Callable[..., Any], float]],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list[Any]],
) -> Scores:
    """Run each (name, function, weight) on the batch. Everything goes by keyword, as TRL
    passes it, so `def reward_len(completions, **kwargs)` works; `columns` as lists."""
    names = [name for name, _, _ in functions]
    if len(set(names)) != len(names):
        raise ValueError(f"reward function names must be unique, got {names}")
    scores = Scores(total=[0.0] * len(completions))
    for name, function, weight in functions:
        try:
            rewards = check_rewards(
                function(prompts=prompts, completions=completions, **columns), len(completions)
            )
        except Exception as e:
            error = traceback.format_exception_only(e)[-1].strip()
            logger.warning("reward function %s failed; None for this batch: %s", name, error)
            scores.errors[name] = error
            rewards = [None] * len(completions)
        scores.per_function[name] = rewards
        for i, reward in enumerate(rewards):
            if reward is not None:
                scores.total[i] += weight * reward
    return scores
