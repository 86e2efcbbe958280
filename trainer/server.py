"""The trainer's network side: one thread that owns the ZeroMQ ROUTER and talks to every worker.

It answers hello with the run spec, sends newer weights to a worker before its next lease,
leases prompts (pull-based: a worker asks when it is free, so fast workers ask often and slow
ones rarely), hands submissions to the intake (checks, scoring) and puts scored groups in the
buffer the training thread reads. It never waits for a worker: a silent worker's leases expire
and are leased again. Every worker is untrusted: each message is rate-limited and size-checked
before it is decoded (limits.py), every refusal is charged in the ledger (ledger.py), and a
quarantined worker gets no more leases. A worker asking for its next lease while it still
generates one waits while a worker holding none is refused for lack of room, so a slow
worker's early requests cannot starve a fast one. A worker that asks again before the weight
chain it was sent has arrived is sent only what was published since (nothing, if that is
nothing: the chain's remaining messages answer it). Per message the work is
O(1) in workers and leases; silence and deadlines are checked at most twice a second. The
training thread talks to it only through `weights` (a WeightPublisher), `next_batch`,
`take_rewards`, `report_logprob_mismatches` and `worker_table`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

from swarmrl.config import Config
from swarmrl.protocol import messages as m
from swarmrl.protocol.framing import ProtocolError, decode
from swarmrl.protocol.transport import bound_endpoint, make_router, recv_from, send_to
from swarmrl.trainer.buffer import GroupBuffer, ScoredGroup
from swarmrl.trainer.intake import Intake
from swarmrl.trainer.leases import LeaseBook, LeaseError, WaitingWorkers, prompt_id
from swarmrl.trainer.ledger import Ledger, WorkerRecord
from swarmrl.trainer.limits import Gate
from swarmrl.trainer.publish import WeightPublisher
from swarmrl.trainer.verify import LogprobMismatch, SubmissionError

log = logging.getLogger("trainer")

QUARANTINED = "this worker sent too many results that failed the trainer's checks"
NO_WORK_RETRY_S = 0.5


class SwarmServer:
    def __init__(
        self,
        config: Config,
        tokenizer: Any,
        tasks: Any,
        reward_functions: list[tuple[str, Any, float]],
        leases: LeaseBook,
        weights: WeightPublisher,
        run_id: str,
    ) -> None:
        import zmq

        self.config = config
        self.intake = Intake(config, tokenizer, tasks, reward_functions)
        self.leases = leases
        self.buffer = GroupBuffer()
        self.run_id = run_id
        self.workers: dict[bytes, WorkerRecord] = {}  # connected, by identity, least recent first
        self.waiting = WaitingWorkers(window_s=4 * NO_WORK_RETRY_S)
        self.ledger = Ledger(config.swarm)  # every worker ever seen, by worker id
        self.weights = weights
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = make_router(
            self._context, config.swarm.bind, config.swarm.max_message_mb * 2**20,
            allow_keys=config.swarm.allow_keys, trainer_key=config.swarm.trainer_key,
        )  # fmt: skip
        self.endpoint = bound_endpoint(self._socket)
        self.gate = Gate(config, tokenizer)
        self._thread = threading.Thread(target=self._serve, name="swarm-server", daemon=True)

    # ---- called from the training thread -------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.buffer.close()
        self._thread.join(timeout=10)
        self._context.destroy(linger=0)

    @property
    def version(self) -> int:
        return self.weights.version

    def next_batch(self, timeout_s: float) -> list[ScoredGroup] | None:
        """`prompts_per_step` fresh groups, or None if they did not arrive within the timeout."""
        trainer = self.config.trainer
        batch, stale = self.buffer.take(
            trainer.prompts_per_step, self.version, trainer.max_staleness, timeout_s
        )
        if stale:
            with self._lock:
                self.leases.requeue([group.prompt_index for group in stale])
            log.info(
                "%d groups went stale in the buffer; their prompts are leased again", len(stale)
            )
        return batch

    def take_rewards(self) -> list[float]:
        """Rewards of every sample scored since the last call."""
        with self._lock:
            return self.intake.take_rewards()

    def report_logprob_mismatches(self, mismatches: list[LogprobMismatch]) -> None:
        """Charge the workers whose sequences the training step masked out of the loss."""
        by_worker: dict[str, list[LogprobMismatch]] = {}
        for mismatch in mismatches:
            by_worker.setdefault(mismatch.worker_id, []).append(mismatch)
        with self._lock:
            for worker_id, failed in by_worker.items():
                log.warning(
                    "%s: %d sequences failed the log-prob check (mean |gap| up to %.3g); "
                    "not trained on",
                    worker_id, len(failed), max(f.mean_gap for f in failed),
                )  # fmt: skip
                self._charge(self.ledger.records[worker_id], "logprob_mismatch", len(failed))

    def put_back(self, kept: list[ScoredGroup], refused: list[ScoredGroup]) -> None:
        """After screening a batch: `kept` go back to the buffer, the prompts of `refused` back
        in the queue. (Charge the refused groups' workers after this: a worker it quarantines
        then loses its kept groups too, as every quarantine takes its buffered groups.)"""
        with self._lock:
            self.buffer.put_back(kept)
            self.leases.requeue([g.prompt_index for g in refused])

    def worker_table(self) -> dict[str, dict[str, Any]]:
        """The ledger: every worker's counts, throughput and state, as plain data."""
        with self._lock:
            return self.ledger.table(time.monotonic())

    def lease_state(self) -> dict:
        """The prompt stream's position, for a checkpoint; buffered groups count as owed."""
        with self._lock:
            state = self.leases.state()
            state["requeued"] = [g.prompt_index for g in self.buffer.peek()] + state["requeued"]
            return state

    # ---- the network thread --------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _serve(self) -> None:
        interval = min(self.config.swarm.heartbeat_interval_s, 0.5)
        next_check = 0.0
        while not self._stop.is_set():
            received = recv_from(self._socket, timeout_s=interval)
            now = time.monotonic()
            with self._lock:
                if received is not None:
                    identity, frames = received
                    try:
                        self._receive(identity, frames, now)
                    except Exception:  # one bad message must not take the swarm down
                        log.exception("error handling a message from %s", identity.hex()[:8])
                        self._refuse(identity, None, "internal", "the trainer failed on this")
                # Only judge silence once every queued message has been read: after a slow
                # step, waiting heartbeats must count before anyone is declared gone.
                if now >= next_check and not self._socket.poll(0):
                    self._expire(now)
                    next_check = now + interval

    def _send(self, identity: bytes, message: Any, blobs: tuple = ()) -> None:
        send_to(self._socket, identity, message, blobs)

    def _refuse(self, identity: bytes, lease_id: str | None, reason: str, detail: str) -> None:
        detail = detail[: m.MAX_REASON_CHARS]
        self._send(identity, m.Reject(lease_id=lease_id, reason=reason, detail=detail))

    def _receive(self, identity: bytes, frames: list, now: float) -> None:
        """Refuse what costs nothing to refuse before decoding; handle the rest."""
        worker = self.workers.get(identity)
        may_submit = (
            worker is not None and not worker.quarantined and self.leases.held(worker.worker_id)
        )
        size = sum(len(frame) for frame in frames)
        refusal = self.gate.refusal(identity, size, bool(may_submit), now)
        if refusal is None:
            self._handle(identity, frames, now)
            return
        if worker is not None:
            self._charge(worker, refusal[0])
        self._refuse(identity, None, *refusal)

    def _handle(self, identity: bytes, frames: list, now: float) -> None:
        worker = self.workers.get(identity)
        try:
            message, _ = decode(frames, max_blobs=0)
        except ProtocolError as error:
            log.warning("malformed message from %s: %s", identity.hex()[:8], error)
            if worker is not None:
                self._charge(worker, error.reason)
            self._refuse(identity, None, error.reason, str(error))
            return
        if isinstance(message, m.Hello):
            self._hello(identity, message, now)
            return
        if worker is None:
            self._refuse(identity, None, "unknown_worker", "send hello first")
            return
        worker.last_seen = now
        self.workers[identity] = self.workers.pop(identity)  # now the most recently heard
        if worker.quarantined and isinstance(message, m.WorkRequest | m.Submission):
            self._refuse(identity, getattr(message, "lease_id", None), "quarantined", QUARANTINED)
        elif isinstance(message, m.WorkRequest):
            self._work(identity, worker, message, now)
        elif isinstance(message, m.Submission):
            self._submission(identity, worker, message, now)
        elif isinstance(message, m.Heartbeat):
            worker.weights_version = message.weights_version
            self._send(identity, m.Heartbeat(sent_at=time.time(), weights_version=self.version))
        elif isinstance(message, m.Bye):
            self._drop(identity, f"said bye ({message.reason})")
        else:
            self._charge(worker, "unexpected")
            self._refuse(identity, None, "unexpected", f"a worker does not send {message.type}")

    def _hello(self, identity: bytes, hello: m.Hello, now: float) -> None:
        if hello.protocol_version != m.PROTOCOL_VERSION:
            detail = (
                f"trainer speaks protocol {m.PROTOCOL_VERSION}, worker {hello.protocol_version}"
            )
            self._refuse(identity, None, "bad_version", detail)
            return
        if identity in self.workers:  # a reconnect: its old leases are void
            self._drop(identity, "reconnected")
        connected = {w.worker_id for w in self.workers.values()}
        record = self.ledger.join(self.ledger.new_id(hello.worker_name, connected), now)
        record.backend, record.max_prompts = hello.backend, hello.max_prompts_per_lease
        record.weights_version = hello.weights_version
        record.sent_version = -1  # whatever the old connection was sent is lost with it
        self.workers[identity] = record
        worker_id = record.worker_id
        log.info("%s joined (%s backend, up to %d prompts per lease)",
                 worker_id, hello.backend, hello.max_prompts_per_lease)  # fmt: skip
        c = self.config
        self._send(
            identity,
            m.RunSpec(
                protocol_version=m.PROTOCOL_VERSION,
                run_id=self.run_id,
                worker_id=worker_id,
                model=c.model.name,
                dtype=c.model.dtype,
                sampling=m.SamplingParams(
                    temperature=c.sampling.temperature,
                    top_p=c.sampling.top_p,
                    top_k=c.sampling.top_k,
                    max_tokens=c.sampling.max_completion_length,
                    stop=c.sampling.stop,
                    logprobs_mode="processed",
                ),
                num_generations=c.sampling.num_generations,
                heartbeat_interval_s=c.swarm.heartbeat_interval_s,
                heartbeat_timeout_s=c.swarm.heartbeat_timeout_s,
                weights_version=self.version,
            ),
        )

    def _work(
        self, identity: bytes, worker: WorkerRecord, request: m.WorkRequest, now: float
    ) -> None:
        worker.weights_version = start = request.weights_version
        in_flight = now - worker.sent_at < self.config.swarm.heartbeat_timeout_s
        if 0 <= start < worker.sent_version and in_flight:
            start = worker.sent_version  # it asked before the chain it was sent arrived
        updates = self.weights.catch_up(start)
        if updates:  # the worker asks again once it holds the current weights
            for update, payload in updates:
                self._send(identity, update, payload)
            worker.sent_version, worker.sent_at = updates[-1][0].version, now
            return
        if start != request.weights_version:
            return  # the chain on its way answers this request too: the worker asks again after
        held = self.leases.held(worker.worker_id)
        if held >= self.config.swarm.max_open_leases:
            self._charge(worker, "too_many_leases")
            detail = f"{held} leases open (at most {self.config.swarm.max_open_leases})"
            self._refuse(identity, None, "too_many_leases", detail)
            return
        # Lease only what can still be trained on: the groups of the step in progress are out
        # of the buffer, so `max_staleness` more steps' worth is the most that stays fresh.
        trainer = self.config.trainer
        limit = trainer.prompts_per_step * max(trainer.max_staleness, 1)
        room = limit - self.leases.outstanding - len(self.buffer)
        count = min(request.max_prompts, worker.max_prompts, self.config.swarm.prompts_per_lease)
        if room <= 0 or (held and self.waiting.others(worker.worker_id, now)):
            if not held:
                self.waiting.refused(worker.worker_id, now)
            reason = "enough work is out" if room <= 0 else "an idle worker goes first"
            self._send(identity, m.NoWork(reason=reason, retry_after_s=NO_WORK_RETRY_S))
            return
        self.waiting.discard(worker.worker_id)
        # The version catch_up found current: a publish since then must not move this lease
        # past the weights the worker holds.
        lease = self.leases.issue(worker.worker_id, min(count, room), request.weights_version, now)
        prompts = [
            m.LeasePrompt(prompt_id=prompt_id(i), token_ids=self.intake.prompt(i)[1], seed=seed)
            for i, seed in zip(lease.prompt_indices, lease.seeds, strict=True)
        ]
        leased = ",".join(p.prompt_id for p in prompts)
        log.debug("lease %s (%s) leased to %s", lease.lease_id, leased, worker.worker_id)
        self._send(
            identity,
            m.Lease(
                lease_id=lease.lease_id,
                policy_version=lease.policy_version,
                num_generations=self.config.sampling.num_generations,
                prompts=prompts,
                deadline_s=self.leases.lease_timeout_s,
            ),
        )

    def _submission(
        self, identity: bytes, worker: WorkerRecord, sub: m.Submission, now: float
    ) -> None:
        samples = sum(len(group.completions) for group in sub.groups)
        try:
            self.intake.replays.check_lease(sub.lease_id)
            lease = self.leases.close(sub.lease_id, worker.worker_id, now)
        except (SubmissionError, LeaseError) as error:
            self._reject(identity, worker, sub.lease_id, samples, error)
            return
        try:
            groups = self.intake.admit(sub, lease, self.version, worker.worker_id)
        except SubmissionError as error:
            self.leases.requeue(lease.prompt_indices)
            self._reject(identity, worker, sub.lease_id, samples, error)
            return
        except Exception:
            self.leases.requeue(lease.prompt_indices)  # the lease is closed: keep its prompts
            raise
        useful = [group for group in groups if group.has_signal()]
        for group in useful:
            self.buffer.put(group)
        self.ledger.accept(worker, samples)
        self._send(identity, m.Accept(lease_id=sub.lease_id, accepted_groups=len(groups)))
        log.debug(
            "lease %s (%s) accepted from %s: %d samples, %d/%d groups with reward spread",
            sub.lease_id, ",".join(g.prompt_id for g in sub.groups), worker.worker_id,
            samples, len(useful), len(groups),
        )  # fmt: skip

    def _reject(
        self,
        identity: bytes,
        worker: WorkerRecord,
        lease_id: str,
        samples: int,
        error: SubmissionError | LeaseError,
    ) -> None:
        log.warning(
            "%s: lease %s rejected: %s (%s)", worker.worker_id, lease_id, error.reason, error.detail
        )
        self._charge(worker, error.reason, samples)
        self._refuse(identity, lease_id, error.reason, error.detail)

    def _charge(self, worker: WorkerRecord, reason: str, samples: int = 1) -> None:
        """Count a refusal in the ledger; stop leasing to a worker it puts in quarantine."""
        if not self.ledger.reject(worker, reason, samples):
            return
        lost = self.leases.expire_worker(worker.worker_id)
        dropped = self.buffer.drop_worker(worker.worker_id)
        self.leases.requeue([group.prompt_index for group in dropped])
        log.warning(
            "%s quarantined: %d of its samples were rejected for cause (%s); its %d open "
            "leases and %d buffered groups go back in the queue and it gets no more",
            worker.worker_id, worker.faults,
            ", ".join(f"{r} {n}" for r, n in sorted(worker.reasons.items())),
            len(lost), len(dropped),
        )  # fmt: skip

    def _drop(self, identity: bytes, why: str) -> None:
        worker = self.workers.pop(identity)
        self.waiting.discard(worker.worker_id)
        worker.connected = False
        lost = self.leases.expire_worker(worker.worker_id)
        count = sum(len(lease.prompt_indices) for lease in lost)
        log.info(
            "%s left: %s; %d leased prompts go back in the queue", worker.worker_id, why, count
        )

    def _expire(self, now: float) -> None:
        timeout = self.config.swarm.heartbeat_timeout_s
        silent = itertools.takewhile(
            lambda item: now - item[1].last_seen > timeout, self.workers.items()
        )
        for identity, _ in list(silent):
            self._drop(identity, f"silent for more than {timeout:.0f}s")
        self.gate.limiter.forget_idle(now)
        for lease in self.leases.expire_due(now):
            log.info(
                "lease %s of %s expired; %d prompts leased again",
                lease.lease_id,
                lease.worker_id,
                len(lease.prompt_indices),
            )
