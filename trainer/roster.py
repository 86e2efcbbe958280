"""Who is connected, and what follows when a worker joins, is charged, leaves or goes silent.

The roster maps each live connection (its ZeroMQ identity) to the worker's ledger record,
least recently heard first, so the silence check reads only the silent ones. Charging a
refusal goes through the ledger; if that puts the worker in quarantine, its open leases and
buffered groups go back in the queue. A worker that leaves or falls silent gives its leases
back. Runs on the server's network thread, under the server's lock.
"""

from __future__ import annotations

import itertools
import logging

from swarmrl.protocol import messages as m
from swarmrl.trainer.buffer import GroupBuffer
from swarmrl.trainer.leases import LeaseBook
from swarmrl.trainer.ledger import Ledger, WorkerRecord
from swarmrl.trainer.logprob_check import LogprobMismatch

log = logging.getLogger("trainer")


class Roster:
    def __init__(self, ledger: Ledger, leases: LeaseBook, buffer: GroupBuffer) -> None:
        self.ledger, self.leases, self.buffer = ledger, leases, buffer
        self.workers: dict[bytes, WorkerRecord] = {}  # by identity, least recently heard first

    def get(self, identity: bytes) -> WorkerRecord | None:
        return self.workers.get(identity)

    def heard(self, identity: bytes, now: float) -> WorkerRecord:
        worker = self.workers.pop(identity)
        worker.last_seen = now
        self.workers[identity] = worker  # now the most recently heard
        return worker

    def join(self, identity: bytes, hello: m.Hello, now: float) -> WorkerRecord:
        """The record of a worker that said hello (a reconnect's old leases are void)."""
        if identity in self.workers:
            self.drop(identity, "reconnected")
        connected = {w.worker_id for w in self.workers.values()}
        record = self.ledger.join(self.ledger.new_id(hello.worker_name, connected), now)
        record.backend, record.max_prompts = hello.backend, hello.max_prompts_per_lease
        record.software = hello.software_version
        record.weights_version = hello.weights_version
        record.sent_version = -1  # whatever the old connection was sent is lost with it
        self.workers[identity] = record
        log.info(
            "%s joined (%s backend, swarmrl %s, up to %d prompts per lease)",
            record.worker_id,
            hello.backend,
            hello.software_version,
            hello.max_prompts_per_lease,
        )
        return record

    def charge(self, worker: WorkerRecord, reason: str, samples: int = 1) -> None:
        """Count a refusal in the ledger; stop leasing to a worker it puts in quarantine."""
        if not self.ledger.reject(worker, reason, samples):
            return
        lost = self.leases.expire_worker(worker.worker_id)
        dropped = self.buffer.drop_worker(worker.worker_id)
        self.leases.requeue([group.prompt_index for group in dropped])
        log.warning(
            "%s quarantined: %d of its samples were rejected for cause (%s); its %d "
            "open leases and %d buffered groups go back in the queue and it gets no more",
            worker.worker_id,
            worker.faults,
            ", ".join(f"{r} {n}" for r, n in sorted(worker.reasons.items())),
            len(lost),
            len(dropped),
        )

    def charge_mismatches(self, mismatches: list[LogprobMismatch]) -> None:
        """Charge the workers whose sequences failed the log-prob check."""
        by_worker: dict[str, list[LogprobMismatch]] = {}
        for mismatch in mismatches:
            by_worker.setdefault(mismatch.worker_id, []).append(mismatch)
        for worker_id, failed in by_worker.items():
            log.warning(
                "%s: %d sequences failed the log-prob check (mean |gap| up to %.3g); "
                "not trained on",
                worker_id,
                len(failed),
                max(f.mean_gap for f in failed),
            )
            self.charge(self.ledger.records[worker_id], "logprob_mismatch", len(failed))

    def drop(self, identity: bytes, why: str) -> None:
        worker = self.workers.pop(identity)
        worker.connected = False
        lost = self.leases.expire_worker(worker.worker_id)
        count = sum(len(lease.prompt_indices) for lease in lost)
        log.info(
            "%s left: %s; %d leased prompts go back in the queue", worker.worker_id, why, count
        )

    def drop_silent(self, now: float, timeout: float) -> None:
        """Drop every worker not heard from for longer than `timeout`."""
        silent = itertools.takewhile(
            lambda item: now - item[1].last_seen > timeout, self.workers.items()
        )
        for identity, _ in list(silent):
            self.drop(identity, f"silent for more than {timeout:.0f}s")

    def behind(self, version: int) -> list[str]:
        """Connected workers that do not hold `version`."""
        return [w.worker_id for w in self.workers.values() if w.weights_version != version]
