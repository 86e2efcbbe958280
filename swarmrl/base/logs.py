"""Logging tagged by role (`trainer`, `worker-3`) to the console and the run folder, and metrics.

Every process calls `setup_logging(role, folder)` once: lines look like
`12:01:02 trainer  INFO  step 3 ...` on stderr and in `<folder>/<role>.log`. Console lines go
through tqdm so they do not tear the progress bar. `trace_crashes` makes a process that dies
leave a trace in its run folder: an uncaught exception in any thread is logged with the
thread's name, and a fatal signal (a segfault, an abort) dumps every thread's stack into
`faults.log`. `MetricsWriter` appends one JSON object per step to `metrics.jsonl` and mirrors
the scalars to what `logging.report_to` names (TensorBoard, Weights & Biases: each imported
only when asked for); `read_metrics` reads the file back, from where a reader left off.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

FAULTS_FILE = "faults.log"
_fault_files: list[Any] = []  # kept open for faulthandler, which writes to the descriptor


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


def trace_crashes(folder: Path, log: logging.Logger) -> None:
    """Log uncaught exceptions with their thread; dump all stacks on a fatal signal."""
    fault_file = (folder / FAULTS_FILE).open("a")
    fault_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} process started\n")
    fault_file.flush()
    faulthandler.enable(fault_file, all_threads=True)
    _fault_files.append(fault_file)

    def thread_died(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "?"
        error = (args.exc_type, args.exc_value, args.exc_traceback)
        log.critical("uncaught %s in thread %s", args.exc_type.__name__, name, exc_info=error)

    previous = sys.excepthook

    def main_died(kind: type[BaseException], value: BaseException, trace: Any) -> None:
        if not issubclass(kind, KeyboardInterrupt):
            error = (kind, value, trace)
            log.critical("uncaught %s in the main thread", kind.__name__, exc_info=error)
        previous(kind, value, trace)

    threading.excepthook = thread_died
    sys.excepthook = main_died


METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """metrics.jsonl (one line per event) plus each `report_to` target, in the run folder.

    W&B: the run is named after the run folder and keeps its id in `wandb.id` there, so a
    resumed run goes on in the same W&B run; `WANDB_PROJECT` picks the project (default
    swarmrl), `WANDB_MODE=offline` keeps it on this machine."""

    def __init__(
        self, folder: Path, report_to: list[str], settings: dict[str, Any] | None = None
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / METRICS_FILE
        self._file = self.path.open("a")
        self._board = None
        self._wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(folder / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            run_id = folder / "wandb.id"
            if not run_id.exists():
                run_id.write_text(secrets.token_hex(6))
            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "swarmrl"),
                name=folder.name,
                id=run_id.read_text().strip(),
                resume="allow",
                dir=str(folder),
                config=settings,
            )

    def write(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {
            f"{kind}/{name}": value
            for name, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if self._board is not None:
            for name, value in scalars.items():
                self._board.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(folder: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The records of metrics.jsonl from byte `offset` on, and the offset after the last whole
    line (a line still being written is left for the next call)."""
    path = folder / METRICS_FILE
    if not path.is_file():
        return [], 0
    with path.open("rb") as file:
        file.seek(offset)
        data = file.read()
    whole = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in whole.splitlines() if line.strip()], offset + len(whole)
