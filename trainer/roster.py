"""Who is connected, and what follows when a worker joins, is charged, leaves, goes silent or
is proven honest.

The roster maps each live connection (its ZeroMQ identity) to the worker's ledger record,
least recently heard first, so the silence check reads only the silent ones. Charging a
refusal goes through the ledger; if that puts the worker in quarantine, its open leases and
buffered groups go back in the queue. A worker that leaves or falls silent gives its leases
back. Screening (the training thread's log-prob check of a new worker's groups) proves a
worker or refuses its groups. Everything here runs under the server's lock.
"""

from __future__ import annotations

import itertools
import logging

from swarmrl.protocol import messages as m
from swarmrl.protocol.refusals import Refused
from swarmrl.trainer.buffer import GroupBuffer, ScoredGroup
from swarmrl.trainer.contributions import ContributionLedger
from swarmrl.trainer.leases import LeaseBook, prompt_id
from swarmrl.trainer.ledger import Ledger, WorkerRecord
from swarmrl.trainer.logprob_check import LogprobMismatch

log = logging.getLogger("trainer")


class Roster:
    def __init__(
        self,
        ledger: Ledger,
        leases: LeaseBook,
        buffer: GroupBuffer,
        max_new_per_address: int,
        contributions: ContributionLedger | None = None,
    ) -> None:
        self.ledger, self.leases, self.buffer = ledger, leases, buffer
        self.max_new_per_address = max_new_per_address
        self.contributions = contributions
        self.workers: dict[bytes, WorkerRecord] = {}  # by identity, least recently heard first

    def get(self, identity: bytes) -> WorkerRecord | None:
        return self.workers.get(identity)

    def heard(self, identity: bytes, now: float) -> WorkerRecord:
        worker = self.workers.pop(identity)
        worker.last_seen = now
        self.workers[identity] = worker  # now the most recently heard
        return worker

    def join(
        self, identity: bytes, hello: m.Hello, now: float, address: str = "", key: str = ""
    ) -> WorkerRecord:
        """The record of a worker that said hello: a new one for a new connection; a worker
        reconnecting (the same identity) gets its record (and standing) back, old leases void.
        Refused if the swarm is closed and this key was quarantined, or if the address
        already has `max_new_workers_per_address` connected workers not yet proven."""
        if identity in self.workers:
            self.leases.expire_worker(self.workers[identity].worker_id)
        elif identity not in self.ledger.by_identity:
            if self.ledger.key_quarantined(key):
                raise Refused("quarantined", "this worker's key was quarantined in this run")
            crowd = sum(1 for w in self.workers.values() if w.address == address and not w.proven)
            if address and crowd >= self.max_new_per_address:
                detail = f"{crowd} workers not yet proven are connected from {address}"
                raise Refused("too_many_workers", detail)
        record = self.ledger.join(hello.worker_name, identity, now, address, key)
        record.backend, record.max_prompts = hello.backend, hello.max_prompts_per_lease
        record.software = hello.software_version
        record.weights_version = hello.weights_version
        record.sent_version = -1  # whatever the old connection was sent is lost with it
        self.workers.pop(identity, None)
        self.workers[identity] = record  # the most recently heard
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

    def reject_submission(
        self, worker: WorkerRecord, lease_id: str, samples: int, refusal: Refused
    ) -> None:
        """A submission failed the intake's checks: log it, record it, charge its worker."""
        log.warning("%s: lease %s rejected: %s", worker.worker_id, lease_id, refusal)
        if self.contributions is not None:
            self.contributions.record(
                "rejected",
                worker.worker_id,
                key=worker.key,
                lease=lease_id,
                reason=refusal.reason,
                samples=samples,
            )
        self.charge(worker, refusal.reason, samples)

    def charge_mismatches(self, mismatches: list[LogprobMismatch], credited: bool = True) -> None:
        """Charge the workers whose sequences failed the log-prob check (`credited`: the
        samples were credited when accepted, so the contribution chain revokes them)."""
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
            worker = self.ledger.records[worker_id]
            if self.contributions is not None and credited:
                prompts = sorted({prompt_id(f.prompt_index) for f in failed})
                self.contributions.record(
                    "revoked",
                    worker_id,
                    key=worker.key,
                    samples=len(failed),
                    reason="logprob_mismatch",
                    prompts=prompts,
                )
            self.charge(worker, "logprob_mismatch", len(failed))

    def drop(self, identity: bytes, why: str) -> None:
        worker = self.workers.pop(identity)
        self.ledger.leave(worker)
        lost = self.leases.expire_worker(worker.worker_id)
        count = sum(len(lease.prompt_indices) for lease in lost)
        log.info(
            "%s left: %s; %d leased prompts go back in the queue", worker.worker_id, why, count
        )

    def drop_silent(self, now: float, timeout: float) -> list[bytes]:
        """Drop every worker not heard from for longer than `timeout`; their identities."""
        silent = itertools.takewhile(
            lambda item: now - item[1].last_seen > timeout, self.workers.items()
        )
        gone = [identity for identity, _ in list(silent)]
        for identity in gone:
            self.drop(identity, f"silent for more than {timeout:.0f}s")
        return gone

    def newcomers(self, batch: list[ScoredGroup]) -> list[ScoredGroup]:
        """The groups of `batch` from workers not yet proven honest (connected or not)."""
        return [group for group in batch if self.is_newcomer(group)]

    def is_newcomer(self, group: ScoredGroup) -> bool:
        return not self.ledger.records[group.worker_id].proven

    def screened(
        self,
        batch: list[ScoredGroup],
        checked: list[ScoredGroup],
        failed: list[LogprobMismatch],
        refuse: bool = True,
    ) -> list[ScoredGroup] | None:
        """Settle a log-prob check of `checked` (groups of `batch`): workers whose groups all
        passed are proven. The batch if none failed; else None, the failing groups refused
        (their prompts leased again, their workers charged) and the rest back in the buffer.
        `refuse=False`: the check ran in a training step, which already masked the failures
        out: only charge their workers."""
        for worker_id in {g.worker_id for g in checked} - {f.worker_id for f in failed}:
            if worker_id in self.ledger.records:
                self.ledger.records[worker_id].proven = True
        if not refuse:
            self.charge_mismatches(failed)
            return batch
        if not failed:
            return batch
        bad = {(f.worker_id, f.prompt_index) for f in failed}
        refused = [g for g in batch if (g.worker_id, g.prompt_index) in bad]
        log.info(
            "screened %d groups from new workers: %d failed the log-prob check; refused",
            len(checked),
            len(refused),
        )
        # Back first: a worker the charge quarantines then loses its kept groups too, as every
        # quarantine takes its buffered groups.
        self.buffer.put_back([g for g in batch if (g.worker_id, g.prompt_index) not in bad])
        self.leases.requeue([g.prompt_index for g in refused])
        self.charge_mismatches(failed)
        return None

    def screened_while_waiting(
        self,
        waiting: list[ScoredGroup],
        idle: list[ScoredGroup],
        failed: list[LogprobMismatch],
    ) -> list[ScoredGroup]:
        """Settle a check run while the step waited: of new workers' buffered groups
        (`waiting`), refused or put back as at a step, and of their uncredited groups without a
        spread (`idle`), which only charge their workers. Returns the idle groups to credit:
        those of workers none of whose groups failed."""
        in_buffer = {(g.worker_id, g.prompt_index) for g in waiting}
        failed_idle = [f for f in failed if (f.worker_id, f.prompt_index) not in in_buffer]
        failing = {f.worker_id for f in failed_idle}  # never proven by their other groups
        checked = [g for g in waiting + idle if g.worker_id not in failing]
        passed = self.screened(waiting, checked, [f for f in failed if f not in failed_idle])
        if passed is not None:
            self.buffer.put_back(passed)
        self.charge_mismatches(failed_idle, credited=False)
        failed_workers = {f.worker_id for f in failed}
        return [g for g in idle if g.worker_id not in failed_workers]

    def behind(self, version: int) -> list[str]:
        """Connected workers that do not hold `version`."""
        return [w.worker_id for w in self.workers.values() if w.weights_version != version]
