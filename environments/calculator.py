"""Calculator tools: exact integer arithmetic for models that cannot multiply in their head."""

from __future__ import annotations

from swarmrl.environments.tools import tool

MAX_DIGITS = 1000  # a result longer than this is refused: the model asked for a huge power


def _checked(value: int) -> int:
    if len(str(abs(value))) > MAX_DIGITS:
        raise ValueError(f"the result has more than {MAX_DIGITS} digits")
    return value


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return _checked(a * b)


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first term
        b: the second term
    """
    return _checked(a + b)
