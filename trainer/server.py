"""The trainer's network side: one thread that owns the ZeroMQ ROUTER and talks to every worker.

It answers hello with the run spec (run_spec.py), sends newer weights to a worker before its
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
from swarmrl.protocol.transport import (
    bound_endpoint,
    make_router,
    peer_address,
    peer_key,
    recv_from,
    send_to,
)
from swarmrl.trainer.buffer import GroupBuffer, ScoredGroup
from swarmrl.trainer.contributions import ContributionLedger
from swarmrl.trainer.egress import Egress
from swarmrl.trainer.intake import Intake
from swarmrl.trainer.leases import LeaseBook, NoRoom
from swarmrl.trainer.ledger import Ledger, WorkerRecord
from swarmrl.trainer.limits import Gate
from swarmrl.trainer.logprob_check import LogprobMismatch
from swarmrl.trainer.publish import WeightPublisher
from swarmrl.trainer.roster import Roster
from swarmrl.trainer.run_spec import run_spec

log = logging.getLogger("trainer")

QUARANTINED = "this worker sent too many results that failed the trainer's checks"
NO_WORK_RETRY_S = 0.5
KEYFRAME_RETRY_S = 2.0  # a new worker whose keyframe must wait for the budget
Screen = Callable[[list[ScoredGroup]], list[LogprobMismatch]]


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
        contributions: ContributionLedger | None = None,
    ) -> None:
        import zmq

        # The socket first: a closed swarm's missing or bad key file fails before anything else.
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
        self.config = config
        self.leases = leases
        self.buffer = GroupBuffer()
        self.run_id = run_id
        self.ledger = Ledger(config.swarm)  # every worker ever seen, by worker id
        self.contributions = contributions  # every verdict, hash-chained (contributions.py)
        self.intake = Intake(config, tokenizer, tasks, reward_functions)
        self.intake.connect(leases, self.buffer, self.ledger, contributions)
        self.roster = Roster(  # the connected ones
            self.ledger,
            leases,
            self.buffer,
            config.swarm.max_new_workers_per_address,
            contributions,
        )
        self.egress = Egress(weights, config.swarm.heartbeat_timeout_s)  # what weights go out
        self.weights = weights
        self._lock = threading.Lock()
        self._stop = threading.Event()
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
        pass each, not a step's slots. While there are too few groups for a step, the buffered
        ones of new workers are checked meanwhile (`_screen_while_waiting`)."""
        trainer = self.config.trainer
        batch, stale = self.buffer.take(
            trainer.prompts_per_step,
            self.version,
            trainer.max_staleness,
            timeout_s,
            minimum=1 if self.starved else None,
        )
        if stale:
            with self._lock:
                self.leases.requeue([group.prompt_index for group in stale])
            log.info(
                "%d groups went stale in the buffer; their prompts are leased again", len(stale)
            )
        if screen is None:
            return batch
        if batch is None:
            self._screen_while_waiting(screen)
            return None
        newcomers = self.roster.newcomers(batch)
        if not newcomers:
            return batch
        failed = screen(newcomers)  # a forward pass: not under the lock
        with self._lock:
            return self.roster.screened(batch, newcomers, failed)

    def _screen_while_waiting(self, screen: Screen) -> None:
        """While the step waits for groups, check the buffered ones of new workers, and their
        kept groups without a spread: a worker is then proven (and gets a proven worker's room
        for leases) after its first groups, not at the first step that takes them, and its
        groups without a spread are credited. Failing groups are refused as at a step."""
        with self._lock:
            waiting = self.buffer.take_where(self.roster.is_newcomer)
            idle = self.intake.take_unchecked()  # their groups without a spread, uncredited
        if not waiting and not idle:
            return
        failed = screen(waiting + idle)  # a forward pass: not under the lock
        with self._lock:
            passed_idle = self.roster.screened_while_waiting(waiting, idle, failed)
            self.intake.credit(passed_idle)

    @property
    def starved(self) -> bool:
        """Rewards saturate: `max_num_gen_batches` steps' worth of groups were scored since
        the last step with too few of them having a spread. Then a step takes what there is
        (verl caps the same search with max_num_gen_batches, and gives up)."""
        cap = self.config.trainer.max_num_gen_batches
        return cap > 0 and self.intake.groups_scored >= cap * self.config.trainer.prompts_per_step

    def report_logprob_mismatches(
        self, mismatches: list[LogprobMismatch], trained: list[ScoredGroup]
    ) -> None:
        """Charge the workers whose sequences the training step masked out of the loss; the
        others whose groups it `trained` passed its check, so they are proven honest."""
        with self._lock:
            self.roster.screened(trained, trained, mismatches, refuse=False)

    def finish(self) -> None:
        """Stop leasing: the run has trained its last step. Workers are still sent the weights
        they lack, so they can end holding the final version (`behind`)."""
        with self._lock:
            self.finishing = True

    def pause_leasing(self, workers: frozenset[str]) -> tuple[int, int]:
        """Lease nothing to `workers` for now (an empty set: lease to all again). Returns the
        groups buffered for the next steps and the leases `workers` still hold."""
        with self._lock:
            self.leases.paused = workers
            return len(self.buffer), sum(self.leases.held(worker) for worker in workers)

    def behind(self) -> list[str]:
        """Connected workers that do not hold the current weights yet."""
        with self._lock:
            version = self.version
            return self.roster.behind(version)

    def spread_counts(self) -> tuple[int, int]:
        """(groups scored since the last step, how many of them had no reward spread)."""
        with self._lock:
            return self.intake.groups_scored, self.intake.groups_without_spread

    def take_episode_check_seconds(self) -> float | None:
        with self._lock:
            return self.intake.take_episode_check_seconds()

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
        """Read one message at a time; check silence and deadlines on a clock (every
        `interval`), however busy the socket. If this thread itself was held up (the process
        starved it), the check waits one more interval, so the heartbeats that queued up
        meanwhile are read before anyone is declared silent."""
        interval = min(self.config.swarm.heartbeat_interval_s, 0.5)
        next_check = last_turn = time.monotonic()
        while not self._stop.is_set():
            received = recv_from(self._socket, timeout_s=max(0.0, next_check - time.monotonic()))
            now = time.monotonic()
            stalled, last_turn = now - last_turn > 2 * interval, now
            with self._lock:
                if received is not None:
                    identity, frames = received
                    try:
                        self._receive(identity, frames, now)
                    except Exception:  # one bad message must not take the swarm down
                        log.exception("error handling a message from %s", identity.hex()[:8])
                        self._refuse(identity, None, Refused("internal", "the trainer failed"))
                if stalled:
                    next_check = now + interval
                elif now >= next_check:
                    self._expire(now)
                    next_check = now + interval

    def _send(self, identity: bytes, message: Any) -> None:
        send_to(self._socket, identity, message)

    def _send_weights(self, identity: bytes, worker: WorkerRecord, updates: list) -> None:
        """Tracked: the payloads' memory is pinned until libzmq lets go of them (Egress)."""
        for update, payload in updates:
            tracker = send_to(self._socket, identity, update, payload, track=True)
            self.egress.sent(identity, worker, update, tracker)

    def _refuse(self, identity: bytes, lease_id: str | None, refusal: Refused) -> None:
        detail = refusal.detail[: m.MAX_REASON_CHARS]
        self._send(identity, m.Reject(lease_id=lease_id, reason=refusal.reason, detail=detail))

    def _receive(self, identity: bytes, frames: list, now: float) -> None:
        """Refuse what costs nothing to refuse before decoding; handle the rest. A connection
        that has not said hello is read only within the strangers' budget, else ignored."""
        worker = self.roster.get(identity)
        size = sum(len(frame) for frame in frames)
        if worker is None and not self.gate.read_stranger(size, now):
            return
        may_submit = (
            worker is not None and not worker.quarantined and self.leases.held(worker.worker_id)
        )
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
            self._hello(identity, message, peer_address(frames[0]), peer_key(frames[0]), now)
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
            worker.weights_version = min(message.weights_version, self.version)
            self._send(identity, m.Heartbeat(sent_at=time.time(), weights_version=self.version))
        elif isinstance(message, m.Bye):
            self.roster.drop(identity, f"said bye ({message.reason})")
            self.egress.leave(identity)
        else:
            self.roster.charge(worker, "unexpected")
            detail = f"a worker does not send {message.type}"
            self._refuse(identity, None, Refused("unexpected", detail))

    def _hello(self, identity: bytes, hello: m.Hello, address: str, key: str, now: float) -> None:
        if hello.protocol_version != m.PROTOCOL_VERSION:
            detail = (
                f"trainer speaks protocol {m.PROTOCOL_VERSION}, worker {hello.protocol_version}"
            )
            self._refuse(identity, None, Refused("bad_version", detail))
            return
        refusal = None if self.roster.get(identity) else self.gate.hello_refusal(address, now)
        try:
            if refusal is not None:
                raise refusal
            record = self.roster.join(identity, hello, now, address, key)
        except Refused as refusal:
            self._refuse(identity, None, refusal)
            return
        self.egress.join(identity, address)
        self._send(identity, run_spec(self.config, self.run_id, record.worker_id, self.version))

    def _work(
        self, identity: bytes, worker: WorkerRecord, request: m.WorkRequest, now: float
    ) -> None:
        if request.weights_version > self.version:
            self.roster.charge(worker, "future_version")
            detail = f"claims version {request.weights_version}; the trainer is at {self.version}"
            self._refuse(identity, None, Refused("future_version", detail))
            return
        answer = self.egress.weights_for(identity, worker, request.weights_version, now)
        if isinstance(answer, str):
            self._send(identity, m.NoWork(reason=answer, retry_after_s=KEYFRAME_RETRY_S))
            return
        if answer is not None:  # weights first (the worker asks again once it holds them), or
            self._send_weights(identity, worker, answer)  # nothing while they are on the way
            return
        if self.finishing:
            self._send(identity, m.NoWork(reason="the run is over", retry_after_s=NO_WORK_RETRY_S))
            return
        wanted = min(request.max_prompts, worker.max_prompts, self.config.swarm.prompts_per_lease)
        try:
            # The version catch_up found current: a publish since then must not move this
            # lease past the weights the worker holds.
            lease = self.leases.offer(
                worker.worker_id,
                wanted,
                request.weights_version,
                len(self.buffer),
                now,
                worker.proven,
            )
        except Refused as refusal:
            self.roster.charge(worker, refusal.reason)
            self._refuse(identity, None, refusal)
            return
        if isinstance(lease, NoRoom):
            self._send(identity, m.NoWork(reason=lease.reason, retry_after_s=NO_WORK_RETRY_S))
            return
        generations = self.config.sampling.num_generations
        message = self.leases.message(lease, self.intake.prompt, generations)
        leased = ",".join(p.prompt_id for p in message.prompts)
        log.debug("lease %s (%s) leased to %s", lease.lease_id, leased, worker.worker_id)
        self._send(identity, message)

    def _submission(
        self, identity: bytes, worker: WorkerRecord, sub: m.Submission, now: float
    ) -> None:
        try:
            self.intake.settle(sub, worker, self.version, now)
        except Refused as refusal:
            samples = sum(len(group.completions) for group in sub.groups)
            self.roster.reject_submission(worker, sub.lease_id, samples, refusal)
            self._refuse(identity, sub.lease_id, refusal)
            return
        self._send(identity, m.Accept(lease_id=sub.lease_id))

    def _expire(self, now: float) -> None:
        for identity in self.roster.drop_silent(now, self.config.swarm.heartbeat_timeout_s):
            self.egress.leave(identity)
        self.gate.forget_idle(now)
        self.egress.forget_idle(now)
        for lease in self.leases.expire_due(now):
            count, owner = len(lease.prompt_indices), lease.worker_id
            log.info(
                "lease %s of %s expired; %d prompts leased again", lease.lease_id, owner, count
            )
