"""The learning-rate schedule: the rate of every optimizer step, as a pure function of the step.

`lr_scheduler_type` and the warmup follow transformers' `get_scheduler` (which TRL uses): with
W warmup steps and N steps in all, the multiplier at step s (0-based) is s / W during warmup,
then 1 (constant), (N - s) / (N - W) (linear) or 0.5 (1 + cos(pi (s - W) / (N - W))) (cosine).
`constant` ignores warmup, as transformers' does. Because the rate depends on the step alone,
a resumed run continues the schedule exactly, and the demo optimizer writes each step's rate
into its payload, so workers replay the scheduled rate.
"""

from __future__ import annotations

import math
from typing import Any

from swarmrl.base.config import TrainerConfig


def warmup_steps(trainer: TrainerConfig) -> int:
    """`warmup_steps`, or `warmup_ratio` of `max_steps` rounded up (transformers' rule)."""
    if trainer.warmup_steps:
        return trainer.warmup_steps
    return math.ceil(trainer.max_steps * trainer.warmup_ratio)


def lr_multiplier(kind: str, step: int, total: int, warmup: int) -> float:
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")


def learning_rate(trainer: TrainerConfig, step: int) -> float:
    """The rate of optimizer step `step` (0-based: the version the step starts from)."""
    multiplier = lr_multiplier(
        trainer.lr_scheduler_type, step, trainer.max_steps, warmup_steps(trainer)
    )
    return trainer.learning_rate * multiplier


def set_learning_rate(optimizer: Any, trainer: TrainerConfig, step: int) -> float:
    rate = learning_rate(trainer, step)
    for group in optimizer.param_groups:
        group["lr"] = rate
    return rate
