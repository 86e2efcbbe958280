"""The live progress display of a training run: one tqdm bar with the swarm's vital signs.

Shows step, mean reward of the samples scored since the last step, accepted samples per
second, connected workers and the ledger in short: each worker's share of the accepted samples,
its rejected samples ("rej N") and whether it is quarantined, for the connected workers with
the most accepted samples (`swarmrl status` lists them all). On a terminal the bar redraws in
place; in a log file tqdm prints a line now and then.
"""

from __future__ import annotations

import time
from typing import Any

SHOWN_WORKERS = 6  # a swarm of hundreds (or a stream of quarantined Sybils) fits on one line


class Progress:
    def __init__(self, total_steps: int, first_step: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=first_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        self.started = time.monotonic()
        self.samples_at_start: int | None = None

    def update(self, steps_done: int, reward: float | None, workers: dict[str, Any]) -> float:
        """Redraw; returns accepted samples per second since the display started."""
        total = sum(w["samples"] for w in workers.values())
        if self.samples_at_start is None:
            self.samples_at_start = total
        rate = (total - self.samples_at_start) / max(time.monotonic() - self.started, 1e-6)
        connected = [name for name, w in workers.items() if w["connected"]]
        ledger = ledger_summary(workers, total)
        reward_text = "-" if reward is None else f"{reward:.3f}"
        self.bar.set_postfix_str(
            f"reward {reward_text} | {rate:.1f} samples/s | {len(connected)} workers | "
            f"{ledger or '-'}",
            refresh=False,
        )
        self.bar.n = steps_done
        self.bar.refresh()
        return rate

    def close(self) -> None:
        self.bar.close()


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
