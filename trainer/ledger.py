"""The per-worker ledger: what each worker contributed, what was refused and why, quarantine.

A record belongs to one connection (its ZeroMQ identity: 16 random bytes a worker keeps
across its reconnects), never to a name: the worker id is the name it gave (or `name-N` when
a record by that name exists), a label for logs and tables. A worker that reconnects gets its
record back; a new connection gets a new one, so a quarantined name cannot be aimed at
whoever comes next under it. Counts are in samples: an accepted
submission adds its completions to `accepted` (from a worker not yet proven honest, only
those of groups with a reward spread: the rest, `unscored`, count toward neither side); a
refusal adds the completions it carried (one for a message that carried none) to
`rejected`. Refusals for cause, the ones an honest worker never earns (FAULTS in
protocol/refusals.py), also add to `faults`; bad luck (a lease that expired, a sample that
went stale) does not. A worker whose faults exceed `swarm.quarantine_rejections` and are more
than `swarm.quarantine_fraction` of all it sent is quarantined: the server gives its open
leases and buffered groups back to the queue and refuses its requests from then on.

Quarantine follows what a worker cannot shed: in a closed swarm its CURVE key (a new
connection with that key is refused), in an open one its address: a new connection from an
address with a quarantined record starts `suspect`, and its first fault quarantines it.
The ledger stays bounded: once there are more than `MAX_RECORDS`, departed records that
never had a sample accepted are folded into one `departed` summary. The trainer writes the
ledger to `workers.json` in the run folder after every step; `swarmrl status` prints it.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmrl.base.config import SwarmConfig
from swarmrl.protocol.refusals import FAULTS

LEDGER_FILE = "workers.json"
MAX_RECORDS = 2000
DEPARTED = "(departed)"  # the table row of folded records


@dataclass
class WorkerRecord:
    worker_id: str
    identity: bytes
    joined: float  # monotonic clock, like last_seen
    last_seen: float
    address: str = ""
    key: str = ""  # a closed swarm's CURVE public key (Z85)
    backend: str = ""
    software: str = ""  # the swarmrl version it reported
    max_prompts: int = 1
    weights_version: int = -1
    sent_version: int = -1  # the newest weights sent to it, and when
    sent_at: float = 0.0
    connected: bool = True
    quarantined: bool = False
    proven: bool = False  # its groups passed the trainer's log-prob check
    suspect: bool = False  # from an address or key with a quarantined record
    accepted: int = 0
    unscored: int = 0  # accepted without a reward spread before it was proven: no credit
    generation_seconds: float = 0.0  # as it reported, for its accepted submissions
    rejected: int = 0
    faults: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class Departed:
    """What folded records add up to."""

    workers: int = 0
    quarantined: int = 0
    rejected: int = 0
    faults: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class Ledger:
    def __init__(self, swarm: SwarmConfig, max_records: int = MAX_RECORDS) -> None:
        self.quarantine_rejections = swarm.quarantine_rejections
        self.quarantine_fraction = swarm.quarantine_fraction
        self.max_records = max_records
        self.records: dict[str, WorkerRecord] = {}
        self.by_identity: dict[bytes, WorkerRecord] = {}
        self.departed = Departed()
        self.quarantined_keys: set[str] = set()
        self.quarantined_addresses: set[str] = set()
        self._numbers = itertools.count(1)

    def join(
        self, name: str, identity: bytes, now: float, address: str = "", key: str = ""
    ) -> WorkerRecord:
        """The record of this connection: its own if it was here before, else a new one whose
        id is `name`, or `name-N` if that is taken."""
        record = self.by_identity.get(identity)
        if record is not None:
            record.connected, record.last_seen = True, now
            return record
        name = name[:100] or "worker"  # room for a -N suffix within the protocol's id limit
        worker_id = name
        while worker_id in self.records:
            worker_id = f"{name}-{next(self._numbers)}"
        suspect = key in self.quarantined_keys if key else address in self.quarantined_addresses
        record = WorkerRecord(worker_id, identity, now, now, address, key, suspect=suspect)
        self.records[worker_id] = record
        self.by_identity[identity] = record
        return record

    def key_quarantined(self, key: str) -> bool:
        return bool(key) and key in self.quarantined_keys

    def accept(
        self, record: WorkerRecord, samples: int, generation_seconds: float = 0.0, unscored: int = 0
    ) -> None:
        record.accepted += samples
        record.unscored += unscored
        record.generation_seconds += generation_seconds

    def reject(self, record: WorkerRecord, reason: str, samples: int = 1) -> bool:
        """Count a refusal; True if it is the one that puts the worker in quarantine."""
        record.rejected += samples
        record.reasons[reason] = record.reasons.get(reason, 0) + 1
        if reason not in FAULTS:
            return False
        record.faults += samples
        threshold = 0 if record.suspect else self.quarantine_rejections
        if record.quarantined or record.faults <= threshold:
            return False
        sent = record.accepted + record.faults
        record.quarantined = record.suspect or record.faults > self.quarantine_fraction * sent
        if record.quarantined:
            if record.key:
                self.quarantined_keys.add(record.key)
            elif record.address:
                self.quarantined_addresses.add(record.address)
        return record.quarantined

    def leave(self, record: WorkerRecord) -> None:
        """A connection ended; fold the oldest departed non-contributors beyond the bound."""
        record.connected = False
        excess = len(self.records) - self.max_records
        if excess <= 0:
            return
        folded = [r for r in self.records.values() if not r.connected and not r.accepted][:excess]
        for old in folded:
            del self.records[old.worker_id]
            del self.by_identity[old.identity]
            summary = self.departed
            summary.workers += 1
            summary.quarantined += old.quarantined
            summary.rejected += old.rejected
            summary.faults += old.faults
            for reason, count in old.reasons.items():
                summary.reasons[reason] = summary.reasons.get(reason, 0) + count

    def table(self, now: float) -> dict[str, dict[str, Any]]:
        """Every record as plain data (`last_seen` as wall-clock seconds since the epoch), and
        the folded ones as one `(departed)` row."""
        wall = time.time()
        rows = {
            r.worker_id: {
                "samples": r.accepted,
                "unscored": r.unscored,
                "rejected": r.rejected,
                "faults": r.faults,
                "reasons": dict(r.reasons),
                "samples_per_s": r.accepted / max(r.last_seen - r.joined, 1.0),
                "generation_seconds": r.generation_seconds,
                "last_seen": wall - (now - r.last_seen),
                "connected": r.connected,
                "quarantined": r.quarantined,
                "proven": r.proven,
                "backend": r.backend,
                "software": r.software,
                "key": r.key,
            }
            for r in self.records.values()
        }
        if self.departed.workers:
            d = self.departed
            rows[DEPARTED] = {
                "samples": 0,
                "unscored": 0,
                "rejected": d.rejected,
                "faults": d.faults,
                "reasons": dict(d.reasons),
                "samples_per_s": 0.0,
                "generation_seconds": 0.0,
                "last_seen": wall,
                "connected": False,
                "quarantined": False,
                "proven": False,
                "backend": "",
                "software": "",
                "key": "",
                "workers": d.workers,
                "quarantined_workers": d.quarantined,
            }
        return rows


def write_ledger(folder: Path, table: dict[str, dict[str, Any]], finished: bool = False) -> None:
    """workers.json in `folder`, replaced atomically: a reader never sees half a file.
    `finished`: the run is over (its workers are no longer connected to anything)."""
    path = folder / LEDGER_FILE
    partial = path.with_suffix(".json.partial")
    data = {"written_at": time.time(), "finished": finished, "workers": table}
    partial.write_text(json.dumps(data, indent=1))
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


def format_table(table: dict[str, dict[str, Any]], now: float, finished: bool = False) -> str:
    """One line per worker: status, accepted and rejected samples, throughput, reasons. Names
    are shown with control characters escaped (they come from workers)."""
    header = ("worker", "status", "accepted", "rejected", "samples/s", "last seen", "reasons")
    rows = [header]
    for name, w in sorted(table.items()):
        reasons = sorted(w["reasons"].items(), key=lambda item: -item[1])
        rows.append(
            (
                printable(name),
                worker_status(name, w, finished),
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


def worker_status(name: str, worker: dict[str, Any], finished: bool) -> str:
    """quarantined, connected or left (every worker has left a finished run)."""
    if worker["quarantined"]:
        return "quarantined"
    if name == DEPARTED:
        return f"{worker['workers']} left ({worker['quarantined_workers']} quarantined)"
    return "left" if finished or not worker["connected"] else "connected"


def run_state(folder: Path, ledger: dict[str, Any]) -> str:
    """finished (its ledger says so), running (its trainer process, on this machine, is alive),
    or stopped without finishing."""
    if ledger.get("finished"):
        return "finished"
    try:
        os.kill(int((folder / "trainer.pid").read_text()), 0)
    except (OSError, ValueError):
        return "stopped without finishing"
    return "running"


def printable(text: str) -> str:
    """`text` with every control character written as an escape (\\x1b, \\n ...)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{max(seconds, 0):.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"
