"""The per-worker ledger: what each worker contributed, what was refused and why, quarantine.

Every worker the trainer has seen has one record, keyed by its trainer-assigned id (the name
it gave, with a -N suffix while a connected worker goes by that name). Counts are in samples: an
accepted submission adds its completions to `accepted`; a refusal adds the completions it
carried (one for a message that carried none) to `rejected`. Refusals for cause, the ones an
honest worker never earns (FAULTS in protocol/refusals.py), also add to `faults`; bad luck (a
lease that expired, a sample that went stale) does not. A worker whose faults exceed
`swarm.quarantine_rejections` and are more than `swarm.quarantine_fraction` of all it sent is
quarantined: the server gives its open leases and buffered groups back to the queue and
refuses its requests from then on. The trainer writes the ledger to `workers.json` in the run
folder after every step; `swarmrl status` prints it as a table.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmrl.base.config import SwarmConfig
from swarmrl.protocol.refusals import FAULTS

LEDGER_FILE = "workers.json"


@dataclass
class WorkerRecord:
    worker_id: str
    joined: float  # monotonic clock, like last_seen
    last_seen: float
    backend: str = ""
    software: str = ""  # the swarmrl version it reported
    max_prompts: int = 1
    weights_version: int = -1
    sent_version: int = -1  # the newest weights sent to it, and when
    sent_at: float = 0.0
    connected: bool = True
    quarantined: bool = False
    proven: bool = False  # its groups passed the trainer's log-prob check
    accepted: int = 0
    generation_seconds: float = 0.0  # as it reported, for its accepted submissions
    rejected: int = 0
    faults: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class Ledger:
    def __init__(self, swarm: SwarmConfig) -> None:
        self.quarantine_rejections = swarm.quarantine_rejections
        self.quarantine_fraction = swarm.quarantine_fraction
        self.records: dict[str, WorkerRecord] = {}
        self._names = 0

    def new_id(self, name: str, connected: set[str]) -> str:
        """`name`, or `name-N` while a connected worker goes by it."""
        name = name[:100] or "worker"  # room for a -N suffix within the protocol's id limit
        worker_id = name
        while worker_id in connected:
            self._names += 1
            worker_id = f"{name}-{self._names}"
        return worker_id

    def join(self, worker_id: str, now: float) -> WorkerRecord:
        """The record of a worker that said hello (a returning id keeps its history)."""
        record = self.records.setdefault(worker_id, WorkerRecord(worker_id, now, now))
        record.connected, record.last_seen = True, now
        return record

    def accept(self, record: WorkerRecord, samples: int, generation_seconds: float = 0.0) -> None:
        record.accepted += samples
        record.generation_seconds += generation_seconds

    def reject(self, record: WorkerRecord, reason: str, samples: int = 1) -> bool:
        """Count a refusal; True if it is the one that puts the worker in quarantine."""
        record.rejected += samples
        record.reasons[reason] = record.reasons.get(reason, 0) + 1
        if reason not in FAULTS:
            return False
        record.faults += samples
        if record.quarantined or record.faults <= self.quarantine_rejections:
            return False
        sent = record.accepted + record.faults
        record.quarantined = record.faults > self.quarantine_fraction * sent
        return record.quarantined

    def table(self, now: float) -> dict[str, dict[str, Any]]:
        """Every record as plain data; `last_seen` as wall-clock seconds since the epoch."""
        wall = time.time()
        return {
            r.worker_id: {
                "samples": r.accepted,
                "rejected": r.rejected,
                "faults": r.faults,
                "reasons": dict(r.reasons),
                "samples_per_s": r.accepted / max(r.last_seen - r.joined, 1.0),
                "generation_seconds": r.generation_seconds,
                "last_seen": wall - (now - r.last_seen),
                "connected": r.connected,
                "quarantined": r.quarantined,
                "backend": r.backend,
                "software": r.software,
            }
            for r in self.records.values()
        }


def write_ledger(folder: Path, table: dict[str, dict[str, Any]]) -> None:
    """workers.json in `folder`, replaced atomically: a reader never sees half a file."""
    path = folder / LEDGER_FILE
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({"written_at": time.time(), "workers": table}, indent=1))
    os.replace(partial, path)


def read_ledger(folder: Path) -> dict[str, Any]:
    path = folder / LEDGER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no worker ledger (the trainer writes it every step)")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("workers"), dict):
        raise ValueError(f"{path}: not a worker ledger")
    return data


def newest_run(root: Path) -> Path:
    """The most recently updated run folder under `root` that has a ledger."""
    ledgers = sorted(root.glob(f"*/{LEDGER_FILE}"), key=lambda p: p.stat().st_mtime)
    if not ledgers:
        raise FileNotFoundError(f"no run folder with a {LEDGER_FILE} under {root}")
    return ledgers[-1].parent


def format_table(table: dict[str, dict[str, Any]], now: float) -> str:
    """One line per worker: status, accepted and rejected samples, throughput, reasons."""
    header = ("worker", "status", "accepted", "rejected", "samples/s", "last seen", "reasons")
    rows = [header]
    for name, w in sorted(table.items()):
        reasons = sorted(w["reasons"].items(), key=lambda item: -item[1])
        rows.append(
            (
                name,
                "quarantined" if w["quarantined"] else "connected" if w["connected"] else "left",
                str(w["samples"]),
                str(w["rejected"]),
                f"{w['samples_per_s']:.2f}",
                _age(now - w["last_seen"]),
                ", ".join(f"{reason} {count}" for reason, count in reasons) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{max(seconds, 0):.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"
