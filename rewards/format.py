"""Format rewards: does the completion have the shape the recipe asks for, whatever its answer.

`think_answer_format` is R1-Zero's `<think>...</think><answer>...</answer>`; when the prompt
already opened `<think>`, the completion starts inside it. `boxed_format` asks for a
`\\boxed{...}`; `answer_only_format` rewards a bare number, for recipes that want concise answers.
"""

from __future__ import annotations

import re
from typing import Any

from swarmrl.rewards.math import NUMBER, last_boxed
from swarmrl.rewards.registry import completion_text, register

_THINK_REST = r"(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*"
_THINK_ANSWER = re.compile(r"\s*<think>" + _THINK_REST, re.DOTALL)
_INSIDE_THINK = re.compile(r"\s*" + _THINK_REST, re.DOTALL)
_BARE_NUMBER = re.compile(f"(?:{NUMBER.pattern})\\.?")


@register("think_answer_format")
def think_answer_format(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """1.0 for `<think>...</think> <answer>...</answer>` and nothing else, else 0.0."""
    rewards = []
    for prompt, completion in zip(prompts, map(completion_text, completions), strict=True):
        opened = prompt.rstrip().endswith("<think>")
        pattern = _INSIDE_THINK if opened else _THINK_ANSWER
        rewards.append(1.0 if pattern.fullmatch(completion) else 0.0)
    return rewards


@register("boxed_format")
def boxed_format(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion has a non-empty `\\boxed{...}`, else 0.0."""
    return [1.0 if last_boxed(completion_text(c)) is not None else 0.0 for c in completions]


@register("answer_only_format")
def answer_only_format(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion is just a number (a trailing period allowed), else 0.0."""
    return [1.0 if _BARE_NUMBER.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]
