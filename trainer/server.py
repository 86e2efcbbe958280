"""The trainer's network side: one thread that owns the ZeroMQ ROUTER and talks to every worker.

It answers hello with the run spec (`run_spec`), sends newer weights to a worker before its
next lease, leases prompts (the lease book decides: leases.LeaseBook.offer), hands submissions
to the intake (checks, scoring) and puts scored groups in the buffer the training thread
reads. It never waits for a worker: a silent worker's leases expire and are leased again.
Every worker is untrusted: each message is rate-limited and size-checked before it is decoded
(limits.py), every refusal is charged in the ledger (ledger.py), and a quarantined worker gets
no more leases. A worker that asks again before the weight chain it was sent has arrived is
sent only what was published since (nothing, if that is nothing: the chain's remaining
messages answer it). Per message the work is O(1) in workers and leases; silence and deadlines
are checked at most twice a second.

The training thread talks to it through `weights` (a WeightPublisher), `next_batch` (which
also screens the groups of workers not yet proven honest), `report_logprob_mismatches`,
`take_rewards`, `worker_table` and `lease_state`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from swarmrl.base.config import Config
from swarmrl.protocol import messages as m
from swarmrl.protocol.framing import ProtocolError, decode
from swarmrl.protocol.refusals import Refused
from swarmrl.protocol.transport import bound_endpoint, make_router, recv_from, send_to
from swarmrl.trainer.buffer import GroupBuffer, ScoredGroup
from swarmrl.trainer.intake import Intake
from swarmrl.trainer.leases import LeaseBook, NoRoom, prompt_id
from swarmrl.trainer.ledger import Ledger, WorkerRecord
from swarmrl.trainer.limits import Gate
from swarmrl.trainer.logprob_check import LogprobMismatch
from swarmrl.trainer.publish import WeightPublisher
from swarmrl.trainer.roster import Roster

log = logging.getLogger("trainer")

QUARANTINED = "this worker sent too many results that failed the trainer's checks"
NO_WORK_RETRY_S = 0.5
Screen = Callable[[list[ScoredGroup]], list[LogprobMismatch]]


def run_spec(config: Config, run_id: str, worker_id: str, version: int) -> m.RunSpec:
    """What a worker is told to run: the model, how to sample, the group size, the clock."""
    sampling, swarm = config.sampling, config.swarm
    return m.RunSpec(
        run_id=run_id,
        worker_id=worker_id,
        model=config.model.name,
        dtype=config.model.dtype,
        sampling=m.SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_completion_length,
            stop=sampling.stop,
        ),
        num_generations=sampling.num_generations,
        heartbeat_interval_s=swarm.heartbeat_interval_s,
        heartbeat_timeout_s=swarm.heartbeat_timeout_s,
        weights_version=version,
    )


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
        self.ledger = Ledger(config.swarm)  # every worker ever seen, by worker id
        self.roster = Roster(self.ledger, leases, self.buffer)  # the connected ones
        self.weights = weights
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._context = zmq.Context()
        swarm = config.swarm
        self._socket = make_router(
            self._context,
            swarm.bind,
            swarm.max_message_mb * 2**20,
            allow_keys=swarm.allow_keys,
            trainer_key=swarm.trainer_key,
        )
        self.endpoint = bound_endpoint(self._socket)
        self.gate = Gate(config, tokenizer)
        self.finishing = False  # the last step is done: weights still go out, leases do not
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
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def version(self) -> int:
        return self.weights.version

    def next_batch(
        self, timeout_s: float, screen: Screen | None = None
    ) -> list[ScoredGroup] | None:
        """`prompts_per_step` fresh groups, or None if they did not arrive within the timeout.

        With `screen` (a log-prob check the training thread runs), the groups of workers not
        yet proven honest are checked first: if any fail, they are refused (their prompts leased
        again, their workers charged), the rest go back to the buffer and the answer is None. A
        worker whose groups all passed is proven; its later groups go straight to the step
        (which checks them again anyway). So a stream of new forgers costs the trainer a forward
        pass each, not a step's slots."""
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
        if batch is None or screen is None:
            return batch
        newcomers = [g for g in batch if not self.ledger.records[g.worker_id].proven]
        if not newcomers:
            return batch
        failed = screen(newcomers)
        bad = {(f.worker_id, f.prompt_index) for f in failed}
        with self._lock:
            for worker_id in {g.worker_id for g in newcomers} - {f.worker_id for f in failed}:
                self.ledger.records[worker_id].proven = True
            if not failed:
                return batch
            refused = [g for g in batch if (g.worker_id, g.prompt_index) in bad]
            log.info(
                "screened %d groups from new workers: %d failed the log-prob check; refused",
                len(newcomers),
                len(refused),
            )
            # Back first: a worker the charge quarantines then loses its kept groups too, as
            # every quarantine takes its buffered groups.
            self.buffer.put_back([g for g in batch if (g.worker_id, g.prompt_index) not in bad])
            self.leases.requeue([g.prompt_index for g in refused])
            self.roster.charge_mismatches(failed)
        return None

    def report_logprob_mismatches(self, mismatches: list[LogprobMismatch]) -> None:
        """Charge the workers whose sequences the training step masked out of the loss."""
        with self._lock:
            self.roster.charge_mismatches(mismatches)

    def finish(self) -> None:
        """Stop leasing: the run has trained its last step. Workers are still sent the weights
        they lack, so they can end holding the final version (`behind`)."""
        with self._lock:
            self.finishing = True

    def behind(self) -> list[str]:
        """Connected workers that do not hold the current weights yet."""
        with self._lock:
            version = self.version
            return self.roster.behind(version)

    def take_rewards(self) -> list[float]:
        """Rewards of every sample scored since the last call."""
        with self._lock:
            return self.intake.take_rewards()

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
                        self._refuse(identity, None, Refused("internal", "the trainer failed"))
                # Only judge silence once every queued message has been read: after a slow
                # step, waiting heartbeats must count before anyone is declared gone.
                if now >= next_check and not self._socket.poll(0):
                    self._expire(now)
                    next_check = now + interval

    def _send(self, identity: bytes, message: Any, blobs: tuple = ()) -> None:
        send_to(self._socket, identity, message, blobs)

    def _refuse(self, identity: bytes, lease_id: str | None, refusal: Refused) -> None:
        detail = refusal.detail[: m.MAX_REASON_CHARS]
        self._send(identity, m.Reject(lease_id=lease_id, reason=refusal.reason, detail=detail))

    def _receive(self, identity: bytes, frames: list, now: float) -> None:
        """Refuse what costs nothing to refuse before decoding; handle the rest."""
        worker = self.roster.get(identity)
        may_submit = (
            worker is not None and not worker.quarantined and self.leases.held(worker.worker_id)
        )
        size = sum(len(frame) for frame in frames)
        refusal = self.gate.refusal(identity, size, bool(may_submit), now)
        if refusal is None:
            self._handle(identity, frames, now)
            return
        if worker is not None:
            self.roster.charge(worker, refusal.reason)
        self._refuse(identity, None, refusal)

    def _handle(self, identity: bytes, frames: list, now: float) -> None:
        worker = self.roster.get(identity)
        try:
            message, _ = decode(frames, max_blobs=0)
        except ProtocolError as error:
            log.warning("malformed message from %s: %s", identity.hex()[:8], error.detail)
            if worker is not None:
                self.roster.charge(worker, error.reason)
            self._refuse(identity, None, error)
            return
        if isinstance(message, m.Hello):
            self._hello(identity, message, now)
            return
        if worker is None:
            self._refuse(identity, None, Refused("unknown_worker", "send hello first"))
            return
        worker = self.roster.heard(identity, now)
        if worker.quarantined and isinstance(message, m.WorkRequest | m.Submission):
            lease_id = getattr(message, "lease_id", None)
            self._refuse(identity, lease_id, Refused("quarantined", QUARANTINED))
        elif isinstance(message, m.WorkRequest):
            self._work(identity, worker, message, now)
        elif isinstance(message, m.Submission):
            self._submission(identity, worker, message, now)
        elif isinstance(message, m.Heartbeat):
            worker.weights_version = message.weights_version
            self._send(identity, m.Heartbeat(sent_at=time.time(), weights_version=self.version))
        elif isinstance(message, m.Bye):
            self.roster.drop(identity, f"said bye ({message.reason})")
        else:
            self.roster.charge(worker, "unexpected")
            detail = f"a worker does not send {message.type}"
            self._refuse(identity, None, Refused("unexpected", detail))

    def _hello(self, identity: bytes, hello: m.Hello, now: float) -> None:
        if hello.protocol_version != m.PROTOCOL_VERSION:
            detail = (
                f"trainer speaks protocol {m.PROTOCOL_VERSION}, worker {hello.protocol_version}"
            )
            self._refuse(identity, None, Refused("bad_version", detail))
            return
        record = self.roster.join(identity, hello, now)
        self._send(identity, run_spec(self.config, self.run_id, record.worker_id, self.version))

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
        if self.finishing:
            self._send(identity, m.NoWork(reason="the run is over", retry_after_s=NO_WORK_RETRY_S))
            return
        wanted = min(request.max_prompts, worker.max_prompts, self.config.swarm.prompts_per_lease)
        try:
            # The version catch_up found current: a publish since then must not move this
            # lease past the weights the worker holds.
            lease = self.leases.offer(
                worker.worker_id, wanted, request.weights_version, len(self.buffer), now
            )
        except Refused as refusal:
            self.roster.charge(worker, refusal.reason)
            self._refuse(identity, None, refusal)
            return
        if isinstance(lease, NoRoom):
            self._send(identity, m.NoWork(reason=lease.reason, retry_after_s=NO_WORK_RETRY_S))
            return
        prompts = [
            m.LeasePrompt(prompt_id=prompt_id(i), token_ids=self.intake.prompt(i)[1], seed=seed)
            for i, seed in zip(lease.prompt_indices, lease.seeds, strict=True)
        ]
        log.debug(
            "lease %s (%s) leased to %s",
            lease.lease_id,
            ",".join(p.prompt_id for p in prompts),
            worker.worker_id,
        )
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
        except Refused as refusal:
            self._reject(identity, worker, sub.lease_id, samples, refusal)
            return
        try:
            groups = self.intake.admit(sub, lease, self.version, worker.worker_id)
        except Refused as refusal:
            self.leases.requeue(lease.prompt_indices)
            self._reject(identity, worker, sub.lease_id, samples, refusal)
            return
        except Exception:
            self.leases.requeue(lease.prompt_indices)  # the lease is closed: keep its prompts
            raise
        useful = [group for group in groups if group.has_signal()]
        for group in useful:
            self.buffer.put(group)
        self.ledger.accept(worker, samples, sub.generation_seconds)
        self._send(identity, m.Accept(lease_id=sub.lease_id))
        log.debug(
            "lease %s (%s) accepted from %s: %d samples, %d/%d groups with reward spread",
            sub.lease_id,
            ",".join(g.prompt_id for g in sub.groups),
            worker.worker_id,
            samples,
            len(useful),
            len(groups),
        )

    def _reject(
        self, identity: bytes, worker: WorkerRecord, lease_id: str, samples: int, refusal: Refused
    ) -> None:
        log.warning(
            "%s: lease %s rejected: %s (%s)",
            worker.worker_id,
            lease_id,
            refusal.reason,
            refusal.detail,
        )
        self.roster.charge(worker, refusal.reason, samples)
        self._refuse(identity, lease_id, refusal)

    def _expire(self, now: float) -> None:
        self.roster.drop_silent(now, self.config.swarm.heartbeat_timeout_s)
        self.gate.limiter.forget_idle(now)
        for lease in self.leases.expire_due(now):
            log.info(
                "lease %s of %s expired; %d prompts leased again",
                lease.lease_id,
                lease.worker_id,
                len(lease.prompt_indices),
            )
