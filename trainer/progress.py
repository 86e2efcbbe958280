"""The live progress display of a training run: one tqdm bar with the swarm's vital signs.

Shows step, mean reward of the samples scored since the last step, accepted samples per
second, connected workers and the ledger in short: each worker's share of the accepted samples,
its rejected samples ("rej N") and whether it is quarantined. On a terminal the bar redraws in
place; in a log file tqdm prints a line now and then.
"""

from __future__ import annotations

import time
from typing import Any


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
        ledger = " ".join(worker_summary(name, w, total) for name, w in sorted(workers.items()))
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
