"""Math answers: finding a completion's final answer, and the rewards that check it.

`extract_final_answer` takes the last `\\boxed{...}`, else the last `<answer>...</answer>`, else
the last "answer is X" / "Answer: X" / "#### X", else the last number. `math_accuracy` compares
that answer with the gold `answer` column through math-verify (`\\frac{1}{2}` equals `0.5`,
`1,000` equals `1000`); `integer_match` is the cheap exact check for integer datasets.

math-verify bounds its work with `signal.alarm`, which only works in the main thread, and the
trainer scores from a network thread. Off the main thread we pass no timeout and instead refuse,
before sympy sees them, the answers that would stall it: very long ones, and numeric power
towers, huge exponents and huge factorials (`10^{10^{10}}` otherwise runs for hours, holding
the GIL).
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal
from typing import Any

from swarmrl.rewards.registry import completion_text, register

# A number; commas only as thousands separators ("1,000", not the "3,4" of a list).
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_PHRASE = re.compile(r"(?:####|\banswer\b\s*(?:is\b|:))[\s:*]*([^\n]+)", re.IGNORECASE)
_GSM8K_GOLD = re.compile(r"####\s*\$?\s*(" + NUMBER.pattern + ")")
# Text that math-verify should search as is: it has `$`/`\(`/`\[` delimiters, or words.
_PROSE = re.compile(r"\$|\\[(\[]|(?<![\\A-Za-z])[A-Za-z]{2,}")

PARSE_TIMEOUT_S = 5
MAX_ANSWER_CHARS = 500  # math-verify parses ~1 kB of LaTeX per second
MAX_EXPONENT = 1e6  # exponents and factorial arguments beyond this are refused


def last_boxed(text: str) -> str | None:
    """The content of the last balanced, non-empty `\\boxed{...}` (nested braces allowed)."""
    found = None
    for match in _BOXED.finditer(text):
        depth = 1
        for end in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                found = text[match.end() : end].strip() or found
                break
    return found


def _clean(phrase: str) -> str:
    return phrase.strip(" \t*").rstrip(".").strip(" \t*")


def extract_final_answer(text: str) -> str | None:
    """The completion's final answer as text, or None when it gives none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    tags = [tag.strip() for tag in _ANSWER_TAG.findall(text) if tag.strip()]
    if tags:
        return tags[-1]
    phrases = [_clean(phrase) for phrase in _ANSWER_PHRASE.findall(text) if _clean(phrase)]
    if phrases:
        return phrases[-1]
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def gsm8k_gold_answer(solution: str) -> str:
    """The number after `####` in a GSM8K solution, without thousands separators."""
    match = _GSM8K_GOLD.search(solution)
    if match is None:
        raise ValueError(f"GSM8K solution has no '#### <number>' line: {solution[-80:]!r}")
    return match.group(1).replace(",", "")


def _parse(text: str, timeout: int | None) -> list[Any]:
    """math-verify's parse; bare LaTeX like `\\frac{1}{2}` is only found inside `$...$`."""
    from math_verify import parse

    wrapped = f"${text}$"
    for candidate in (text, wrapped) if _PROSE.search(text) else (wrapped, text):
        parsed = parse(candidate, parsing_timeout=timeout)
        if parsed:
            return parsed
    return []


def _too_costly(expression: Any) -> bool:
    """A numeric exponent or factorial argument too large for sympy to evaluate quickly."""
    from sympy import Basic, Pow, factorial

    if not isinstance(expression, Basic):
        return False
    exponents = [p.exp for p in expression.atoms(Pow)]
    arguments = [f.args[0] for f in expression.atoms(factorial)]
    for size in exponents + arguments:
        if size.free_symbols:
            continue
        try:
            if abs(complex(size.evalf(15))) > MAX_EXPONENT:
                return True
        except (TypeError, ValueError, OverflowError):
            return True
    return False


@register("math_accuracy")
def math_accuracy(
    prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any
) -> list[float | None]:
    """1.0 when the final answer equals the gold `answer` (math-verify), else 0.0.

    None where the gold answer itself cannot be parsed.
    """
    from math_verify import verify

    timeout = PARSE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    golds: dict[str, list[Any]] = {}
    rewards: list[float | None] = []
    for completion, gold in zip(map(completion_text, completions), answer, strict=True):
        if gold not in golds:
            golds[gold] = _parse(str(gold), timeout)
        if not golds[gold]:
            rewards.append(None)
            continue
        final = extract_final_answer(completion)
        if final is None or len(final) > MAX_ANSWER_CHARS:
            rewards.append(0.0)
            continue
        predicted = _parse(final, timeout)
        if not predicted or any(_too_costly(p) for p in predicted):
            rewards.append(0.0)
            continue
        rewards.append(1.0 if verify(golds[gold], predicted, timeout_seconds=timeout) else 0.0)
    return rewards


@register("integer_match")
def integer_match(
    prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any
) -> list[float | None]:
    """1.0 when the last number in the completion equals the integer gold `answer`, else 0.0.

    None where the gold answer is not an integer.
    """
    rewards: list[float | None] = []
    for completion, gold in zip(map(completion_text, completions), answer, strict=True):
        try:
            target = int(str(gold).replace(",", "").strip())
        except ValueError:
            rewards.append(None)
            continue
        numbers = NUMBER.findall(completion)
        hit = bool(numbers) and Decimal(numbers[-1].replace(",", "")) == target
        rewards.append(1.0 if hit else 0.0)
    return rewards
