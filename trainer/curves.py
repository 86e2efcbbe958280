"""The picture of a run: its curves from metrics.jsonl, as `curves.png` beside it.

`swarmrl run` and `swarmrl train` write it when the run ends and name it in their summary. Six
panels against the step: mean reward, held-out greedy accuracy, loss, the step time split into
its parts (waiting for samples, training, publishing the weights; stacked), the bytes of each
weight update, and accepted samples per second. A resumed run repeats the steps after its
checkpoint; the latest record of each step is the one drawn. Drawn with matplotlib's Agg
backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from swarmrl.base.logs import read_metrics

CURVES_FILE = "curves.png"
STEP_PARTS = [
    ("wait_seconds", "waiting for samples"),
    ("optimize_seconds", "training"),
    ("publish_seconds", "publishing weights"),
]


def write_curves(folder: Path) -> Path:
    """Draw the run in `folder` into folder/curves.png; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    records, _ = read_metrics(folder)
    train, heldout = latest(records, "train"), latest(records, "eval")
    figure, axes = pyplot.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    figure.suptitle(f"{folder.name}: {len(train)} steps")
    line(axes[0][0], train, "reward_mean", "mean reward of scored samples")
    line(axes[0][1], heldout, "accuracy", "held-out greedy accuracy")
    line(axes[0][2], train, "loss", "loss")
    panel = axes[1][0]
    steps = [r["step"] for r in train]
    parts = [[r.get(key) or 0.0 for r in train] for key, _ in STEP_PARTS]
    if steps:
        panel.stackplot(steps, *parts, labels=[label for _, label in STEP_PARTS])
        panel.legend(loc="upper left", fontsize="small")
    panel.set(title="step time (s)", xlabel="step")
    for chart in axes.flat:
        chart.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole steps
    line(axes[1][1], train, "update_bytes", "weight update sent to workers (bytes)")
    line(axes[1][2], train, "accepted_samples_per_s", "accepted samples per second")
    path = folder / CURVES_FILE
    figure.savefig(path, dpi=80)
    pyplot.close(figure)
    return path


def latest(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The records of `kind`, one per step (the last written), in step order."""
    by_step = {r["step"]: r for r in records if r["kind"] == kind}
    return [by_step[step] for step in sorted(by_step)]


def line(axes: Any, records: list[dict[str, Any]], key: str, title: str) -> None:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    axes.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3)
    axes.set(title=title, xlabel="step")
    axes.grid(alpha=0.3)
