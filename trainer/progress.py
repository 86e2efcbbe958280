"""The live progress display of a training run: one tqdm bar with the swarm's vital signs.

Shows step, mean reward of the samples scored since the last step, accepted samples per
second, connected workers and the ledger in short: each worker's share of the accepted samples,
its rejected samples ("rej N") and whether it is quarantined, for the connected workers with
the most accepted samples (`swarmrl status` lists them all). On a terminal the bar redraws in
place; in a log file tqdm prints a line now and then.

The bar's total and its time left are honest about `trainer.max_minutes`: when the time budget
will end the run before `max_steps` at the pace so far, the total is the step the budget
reaches and the time left is the budget's (`estimate`).
"""

from __future__ import annotations

import math
import time
from typing import Any

SHOWN_WORKERS = 6  # a swarm of hundreds (or a stream of quarantined Sybils) fits on one line


class Progress:
    def __init__(self, max_steps: int, first_step: int, max_minutes: float | None = None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=max_steps,
            initial=first_step,
            desc="train",
            dynamic_ncols=True,
            mininterval=1.0,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}]"
            "{postfix}",
        )
        self.max_steps, self.first_step = max_steps, first_step
        self.started = time.monotonic()
        self.deadline = None if max_minutes is None else self.started + 60 * max_minutes
        self.samples_at_start: int | None = None

    def estimate(self, steps_done: int, now: float) -> tuple[int, float | None, bool]:
        """(the step the run will end at, seconds until then or None if unknown, whether the
        time budget is what ends it), at the pace of the steps this display has seen."""
        done_here = steps_done - self.first_step
        pace = (now - self.started) / done_here if done_here > 0 else None
        left = None if pace is None else (self.max_steps - steps_done) * pace
        if self.deadline is None:
            return self.max_steps, left, False
        budget = max(self.deadline - now, 0.0)
        if left is not None and left <= budget:
            return self.max_steps, left, False
        # A step that starts before the deadline is finished: the budget's steps round up.
        end = self.max_steps if pace is None else steps_done + math.ceil(budget / pace)
        return min(end, self.max_steps), budget, True

    def update(
        self,
        steps_done: int,
        reward: float | None,
        workers: dict[str, Any],
        waiting: str | None = None,
    ) -> float:
        """Redraw; returns accepted samples per second since the display started. `waiting`:
        what the step waits for, while it waits (workers, or groups with a reward spread)."""
        from tqdm import tqdm

        now = time.monotonic()
        total = sum(w["samples"] for w in workers.values())
        if self.samples_at_start is None:
            self.samples_at_start = total
        rate = (total - self.samples_at_start) / max(now - self.started, 1e-6)
        connected = [name for name, w in workers.items() if w["connected"]]
        ledger = ledger_summary(workers, total)
        reward_text = "-" if reward is None else f"{reward:.3f}"
        end, left, budget = self.estimate(steps_done, now)
        left_text = "?" if left is None else tqdm.format_interval(left)
        self.bar.set_postfix_str(
            f"left {left_text}{' (time budget)' if budget else ''} | reward {reward_text} | "
            f"{rate:.1f} samples/s | {len(connected)} workers | {ledger or '-'}"
            f"{f' | {waiting}' if waiting else ''}",
            refresh=False,
        )
        self.bar.total, self.bar.n = end, steps_done
        self.bar.refresh()
        return rate

    def close(self) -> None:
        self.bar.close()


def waiting_for(groups_scored: int, without_spread: int) -> str:
    """What a step waits for: signal, when most groups scored since the last step had no
    reward spread (all right or all wrong: rewards saturate), else workers."""
    if groups_scored and 2 * without_spread > groups_scored:
        return f"waiting for reward spread: {without_spread} of {groups_scored} groups had none"
    return "waiting for workers"


def worker_summary(name: str, worker: dict[str, Any], total_samples: int) -> str:
    """`worker-1 60%`, `mallory 0% rej 24 quarantined`: share, rejections, quarantine."""
    share = 100 * worker["samples"] / total_samples if total_samples else 0.0
    text = f"{name} {share:.0f}%"
    if worker["rejected"]:
        text += f" rej {worker['rejected']}"
    if worker["quarantined"]:
        text += " quarantined"
    return text


def ledger_summary(workers: dict[str, Any], total_samples: int) -> str:
    """The connected workers with the most accepted samples, then how many more there are."""

    def rank(item: tuple[str, Any]) -> tuple[bool, int, str]:
        return not item[1]["connected"], -item[1]["samples"], item[0]

    ranked = sorted(workers.items(), key=rank)
    shown = [worker_summary(name, w, total_samples) for name, w in ranked[:SHOWN_WORKERS]]
    hidden = len(ranked) - len(shown)
    quarantined = sum(w["quarantined"] for _, w in ranked[SHOWN_WORKERS:])
    if hidden:
        shown.append(f"+{hidden} more ({quarantined} quarantined)")
    return " ".join(shown)
