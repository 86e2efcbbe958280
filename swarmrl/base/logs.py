"""Logging tagged by role (`trainer`, `worker-3`) to the console and the run folder, and metrics.

Every process calls `setup_logging(role, folder)` once: lines look like
`12:01:02 trainer  INFO  step 3 ...` on stderr and in `<folder>/<role>.log`. Console lines go
through tqdm so they do not tear the progress bar. `MetricsWriter` appends one JSON object per
step to `metrics.jsonl` and mirrors the scalars to TensorBoard.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(role: str, folder: Path | None, level: str = "info") -> logging.Logger:
    """Configure the root logger for this process; returns the role's logger."""
    formatter = logging.Formatter(
        f"%(asctime)s {role:<9} %(levelname)-7s %(message)s", datefmt="%H:%M:%S"
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = _TqdmHandler()
    console.setFormatter(formatter)
    root.addHandler(console)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(folder / f"{role}.log")
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(role)


class MetricsWriter:
    """metrics.jsonl (one line per event) plus TensorBoard scalars, in the run folder."""

    def __init__(self, folder: Path, tensorboard: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.jsonl"
        self._file = self.path.open("a")
        self._board = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(folder / "tensorboard"))

    def write(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._board is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._board.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()
