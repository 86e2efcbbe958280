"""Trying a reward function before a run pays for it: `try_reward` and `Trial.report`.

`try_reward` calls the function on samples in batches, as the trainer would (same signature,
same columns), timing every call. What the trainer would tolerate is recorded: `None` (and
NaN or inf, which the trainer reads as None) and a call that raises (the trainer scores that
batch None; its traceback is kept). What the trainer could never use, a value that is not a
number or a list of the wrong length, is a `RewardContractError` naming the function and the
samples. `report` prints the distribution (quantiles and a histogram), the count of None, the
time per call, the tracebacks and a few examples of each score (`swarmrl rewards test`).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from swarmrl.rewards.scoring import check_rewards

HISTOGRAM_BINS = 10  # more distinct values than this are binned
BAR_WIDTH = 40
TEXT_CHARS = 100  # of a prompt or completion in an example
QUANTILES = [("min", 0.0), ("p10", 0.1), ("p25", 0.25), ("median", 0.5)]
QUANTILES += [("p75", 0.75), ("p90", 0.9), ("max", 1.0)]


class RewardContractError(ValueError):
    """The function returned something no trainer can use; the message names it."""


@dataclass
class Trial:
    name: str
    prompts: list[str]
    completions: list[str]
    rewards: list[float | None] = field(default_factory=list)  # one per sample
    seconds: list[float] = field(default_factory=list)  # one per call
    failures: list[tuple[int, int, str]] = field(default_factory=list)  # (first, end, traceback)

    def report(self, examples: int = 2) -> str:
        calls, count = len(self.seconds), len(self.rewards)
        lines = [f"reward function {self.name}: {count} samples in {calls} call(s)"]
        if calls:
            mean = sum(self.seconds) / calls
            lines.append(
                f"  time per call: mean {_duration(mean)}, max {_duration(max(self.seconds))} "
                f"({_duration(sum(self.seconds) / max(count, 1))} per sample)"
            )
        failed = sum(end - first for first, end, _ in self.failures)
        nones = sum(value is None for value in self.rewards) - failed
        lines.append(f"  None (or NaN/inf): {nones} of {count}")
        if self.failures:
            lines.append(f"  raised: {len(self.failures)} of {calls} calls ({failed} samples)")
        values = sorted(value for value in self.rewards if value is not None)
        if values:
            lines.append(_quantiles(values))
            lines += _histogram(values)
        lines += self._examples(examples)
        for first, end, trace in self.failures[:3]:
            lines.append(f"  exception on samples {first}..{end - 1}:")
            lines += [f"    {line}" for line in trace.rstrip().splitlines()]
        if len(self.failures) > 3:
            lines.append(f"  ({len(self.failures) - 3} more calls raised)")
        return "\n".join(lines)

    def _examples(self, per_score: int) -> list[str]:
        """Up to `per_score` samples of each distinct score (of each bin, if binned)."""
        if per_score <= 0:
            return []
        shown: dict[str, list[int]] = {}
        bins = _bins(sorted(v for v in self.rewards if v is not None))
        for index, value in enumerate(self.rewards):
            label = "None" if value is None else _label(bins, value)
            if len(shown.setdefault(label, [])) < per_score:
                shown[label].append(index)
        lines = ["  examples:"]
        for label, indices in shown.items():
            for index in indices:
                prompt = _short(self.prompts[index])
                completion = _short(self.completions[index])
                lines.append(f"    {label:>12}  prompt {prompt}  completion {completion}")
        return lines


def try_reward(
    name: str,
    function: Callable[..., Any],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list[Any]],
    batch_size: int,
) -> Trial:
    """Call `function` on consecutive batches of `batch_size` samples; `columns` are per-sample
    lists passed as keyword arguments, like dataset columns in training."""
    trial = Trial(name, prompts, completions)
    for first in range(0, len(completions), batch_size):
        end = min(first + batch_size, len(completions))
        batch_columns = {key: values[first:end] for key, values in columns.items()}
        started = time.perf_counter()
        try:
            returned = function(
                prompts=prompts[first:end], completions=completions[first:end], **batch_columns
            )
        except Exception:
            trial.seconds.append(time.perf_counter() - started)
            trial.failures.append((first, end, traceback.format_exc()))
            trial.rewards += [None] * (end - first)
            continue
        trial.seconds.append(time.perf_counter() - started)
        try:
            trial.rewards += check_rewards(returned, end - first)
        except ValueError as error:
            raise RewardContractError(
                f"reward function {name} {error} (samples {first}..{end - 1}); it must return "
                "a list with one float or None per completion"
            ) from None
    return trial


def _quantiles(values: list[float]) -> str:
    def at(q: float) -> float:
        return values[round(q * (len(values) - 1))]

    mean = sum(values) / len(values)
    marks = ", ".join(f"{name} {at(q):.3g}" for name, q in QUANTILES)
    return f"  distribution of {len(values)} numbers: mean {mean:.3g}; {marks}"


def _bins(values: list[float]) -> list[float] | None:
    """Bin edges when there are too many distinct values to list; None lists each value."""
    distinct = sorted(set(values))
    if len(distinct) <= HISTOGRAM_BINS:
        return None
    low, high = distinct[0], distinct[-1]
    return [low + (high - low) * i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)]


def _label(bins: list[float] | None, value: float) -> str:
    if bins is None:
        return f"{value:.4g}"
    index = sum(value > edge for edge in bins[1:-1])
    return f"{bins[index]:.3g}..{bins[index + 1]:.3g}"


def _histogram(values: list[float]) -> list[str]:
    bins = _bins(values)
    counts: dict[str, int] = {}
    for value in values:
        label = _label(bins, value)
        counts[label] = counts.get(label, 0) + 1
    most = max(counts.values())
    return [
        f"    {label:>12}  {'#' * max(1, round(BAR_WIDTH * count / most)):<{BAR_WIDTH}}  {count}"
        for label, count in counts.items()
    ]


def _short(text: str) -> str:
    """repr (control characters escaped), the end of a long text kept: answers come last."""
    return repr(text if len(text) <= TEXT_CHARS else "…" + text[-TEXT_CHARS:])


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"
