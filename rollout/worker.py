"""A rollout worker: connect to a trainer, take leases, generate, submit, apply weight updates.

Everything about the run (model, sampling, group size) comes from the trainer's run spec; the
worker brings only its hardware. Generation runs in a background thread while the main thread
keeps the connection alive (heartbeats both ways), asks for the next lease and takes in
verdicts and weight updates, so the engine never waits on the network between leases. If the
trainer goes silent for longer than the heartbeat timeout, the worker drops the socket and
reconnects by itself with backoff; a trainer restart is just another reconnect. A bad weight
payload is refused without touching the model, and the worker asks for a keyframe.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from swarmrl import __version__
from swarmrl.base.config import EnvironmentConfig
from swarmrl.base.models import pick_device, resolve_model
from swarmrl.environments import Environment, make_environment
from swarmrl.protocol import messages as m
from swarmrl.protocol.auth import CurveClient
from swarmrl.protocol.codecs.interface import PayloadError
from swarmrl.protocol.framing import ProtocolError
from swarmrl.protocol.transport import Channel, make_dealer
from swarmrl.rollout.backend import EngineOptions
from swarmrl.rollout.replica import Replica
from swarmrl.rollout.rollouts import sample_groups
from swarmrl.rollout.tally import Tally

log = logging.getLogger("worker")

WORK = (m.WeightUpdate, m.Lease, m.NoWork)  # the answers to a work request
WEIGHTS_MESSAGE_LIMIT = 64 * 2**30  # a worker must accept full-weight keyframes of big models
WEIGHTS_TIMEOUT_S = 900.0  # a full keyframe over a slow link arrives as one big message


@dataclass
class WorkerOptions:
    connect: str
    name: str = ""
    backend: str = "auto"
    device: str = "auto"
    dtype: str = "auto"  # auto: the trainer's dtype from the run spec
    engine: EngineOptions = field(default_factory=EngineOptions)
    max_prompts_per_lease: int = 8
    slowdown: float = 1.0  # >1 simulates slower hardware: sleep (slowdown-1)x generation time
    max_leases: int | None = None  # stop after this many leases (for tests and benchmarks)
    exit_with_parent: bool = False  # a local worker of `swarmrl run` never outlives it
    curve: CurveClient | None = None  # a closed swarm: this worker's keys, the trainer's key


class TrainerGone(Exception):
    """The trainer stopped answering, said bye, or forgot us: reconnect."""


class Worker:
    def __init__(self, options: WorkerOptions) -> None:
        import zmq

        self.options = options
        self.identity = b"w" + os.urandom(15)  # ZeroMQ reserves identities that start with 0
        self.context = zmq.Context()
        self.channel: Channel | None = None
        self.spec: m.RunSpec | None = None
        self.backend: Any = None
        self.environment: Environment | None = None  # a multi-turn run's, from the run spec
        self.replica: Replica | None = None
        self.version = -1
        self.trainer_version = -1  # as last heard from the trainer
        self.leases_done = 0
        self.inbox: deque[tuple[Any, list]] = deque()  # run specs, leases, weights, in order
        self.requested = False  # a work request is out and not yet answered
        self.submitted: dict[str, tuple[int, int, float]] = {}  # awaiting a verdict
        self.tally = Tally()  # the verdicts so far, for the console
        self.deadlines: dict[str, float] = {}  # lease id -> when the trainer leases it again
        self.next_beat = 0.0
        self.stopping = False
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.parent_pid = os.getppid()

    # ---- connection ----------------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        backoff = 0.5
        try:
            while not self.stopping and not self._enough():
                try:
                    self._connect()
                    backoff = 0.5
                    self._serve()
                except TrainerGone as gone:
                    if self.stopping:
                        break
                    log.warning("%s; reconnecting in %.1fs", gone, backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
        except KeyboardInterrupt:
            self.stopping = True
        finally:
            self._close("worker stopping")

    def _request_stop(self, signum: int, frame: Any) -> None:
        """First SIGINT/SIGTERM: finish the lease in hand, say bye, exit. Second: abort."""
        if self.stopping:
            raise KeyboardInterrupt
        self.stopping = True

    def _enough(self) -> bool:
        if self.options.exit_with_parent and os.getppid() != self.parent_pid:
            log.warning("the process that started this worker is gone; stopping")
            self.stopping = True
        return self.options.max_leases is not None and self.leases_done >= self.options.max_leases

    def _connect(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.inbox.clear()  # leases and verdicts of the old connection are void
        self.submitted.clear()
        self.deadlines.clear()
        self.requested = False
        self.channel = Channel(
            make_dealer(
                self.context,
                self.options.connect,
                self.identity,
                WEIGHTS_MESSAGE_LIMIT,
                curve=self.options.curve,
            )
        )
        try:
            self._send(
                m.Hello(
                    protocol_version=m.PROTOCOL_VERSION,
                    worker_name=self.options.name,
                    backend=self.options.backend,
                    software_version=__version__,
                    max_prompts_per_lease=self.options.max_prompts_per_lease,
                    weights_version=self.version,
                )
            )
            spec, _ = self._await((m.RunSpec,), timeout_s=30.0)
        except TrainerGone as gone:  # a refused CURVE handshake looks just like silence
            curve = self.options.curve
            hint = (
                "if the swarm is closed, this worker needs --key and --trainer-key"
                if curve is None
                else f"CURVE is on: the trainer may not accept this worker's key "
                f"{curve.keys.public.decode()}, or --trainer-key is not the trainer's key"
            )
            raise TrainerGone(f"{gone} ({hint})") from None
        if self.spec is not None and spec.run_id != self.spec.run_id:
            # Another run (or a restarted trainer): version numbers may mean other weights.
            # Keep the engine if the model is the same and let the trainer send a keyframe.
            self.version = -1
            if (spec.model, spec.dtype) != (self.spec.model, self.spec.dtype):
                self.backend = None
        self.spec = spec
        self.environment = self._make_environment(spec.environment)
        self.trainer_version = spec.weights_version
        where = f"{self.options.connect} as {spec.worker_id} (run {spec.run_id}"
        log.info("connected to %s, trainer at version %d)", where, spec.weights_version)
        if self.backend is None:
            self.backend = self._in_background(self._load_backend, spec)
            self.replica = Replica(resolve_model(spec.model), spec.dtype, spec.adapter_scale)
            # Version 0 is the model's own weights, unless they are LoRA adapters: ask for them.
            self.version = -1 if spec.adapter_scale else 0

    @staticmethod
    def _make_environment(spec: m.EnvironmentSpec | None) -> Environment | None:
        """The run's environment, or exit saying what this machine lacks to run it."""
        if spec is None:
            return None
        try:
            return make_environment(EnvironmentConfig.model_validate(spec.model_dump()))
        except Exception as e:
            raise SystemExit(f"this worker cannot run the run's environment: {e}") from None

    def _load_backend(self, spec: m.RunSpec) -> Any:
        from swarmrl.rollout.backends import make_backend

        device, backend = pick_device(self.options.device), self.options.backend
        dtype = spec.dtype if self.options.dtype == "auto" else self.options.dtype
        log.info("loading %s (%s) with the %s backend on %s", spec.model, dtype, backend, device)
        return make_backend(backend, spec.model, dtype, device, self.options.engine)

    def _send(self, message: Any, timeout_s: float = 30.0) -> None:
        """Queue `message`, waiting in short slices (a stop request ends the wait: a blocking
        poll would hold SIGTERM off for the whole timeout); TrainerGone if it cannot."""
        assert self.channel is not None
        timeout_s = 1.0 if self.stopping else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                left = deadline - time.monotonic()
                self.channel.send(message, timeout_s=max(0.0, min(0.5, left)))
                return
            except TimeoutError:
                if self.stopping or time.monotonic() >= deadline:
                    raise TrainerGone(f"trainer not reachable for {timeout_s:g} s") from None

    def _heartbeat(self) -> None:
        self._send(m.Heartbeat(sent_at=time.time(), weights_version=self.version))
        assert self.spec is not None
        self.next_beat = time.monotonic() + self.spec.heartbeat_interval_s

    def _pump(self, timeout_s: float) -> None:
        """Heartbeat if due, then handle at most one message (waiting up to `timeout_s`)."""
        assert self.channel is not None
        if self.spec is not None and time.monotonic() >= self.next_beat:
            self._heartbeat()
        try:
            received = self.channel.recv(timeout_s=max(0.0, min(timeout_s, 0.5)))
        except ProtocolError as error:
            log.warning("dropped a malformed message from the trainer: %s", error)
            return
        if received is not None:
            self._dispatch(*received)

    def _dispatch(self, message: Any, blobs: list) -> None:
        """Verdicts are logged at once; run specs, leases and weights wait in the inbox.

        Raises TrainerGone on bye, SystemExit if the trainer refuses this worker."""
        if isinstance(message, m.Heartbeat):
            self.trainer_version = message.weights_version
        elif isinstance(message, m.Bye):
            raise TrainerGone(f"trainer said bye ({message.reason})")
        elif isinstance(message, m.Reject) and message.reason in ("bad_version", "quarantined"):
            raise SystemExit(f"trainer refused this worker ({message.reason}): {message.detail}")
        elif isinstance(message, m.Reject) and message.reason == "unknown_worker":
            raise TrainerGone("the trainer does not know this worker (it restarted?)")
        elif isinstance(message, (m.Accept, m.Reject)) and message.lease_id in self.submitted:
            self._verdict(message)
        elif isinstance(message, m.Reject) and message.lease_id is None and self.requested:
            log.warning("work request refused: %s (%s)", message.reason, message.detail)
            self.requested = False  # it answered the request: ask again later
            self.inbox.append((m.NoWork(reason=message.reason, retry_after_s=1.0), blobs))
        elif isinstance(message, (m.RunSpec, *WORK)):
            if isinstance(message, WORK):
                self.requested = False
            if isinstance(message, m.Lease):  # its deadline counts from receipt: no clock skew
                self.deadlines[message.lease_id] = time.monotonic() + message.deadline_s
            self.inbox.append((message, blobs))
        else:
            log.warning("skipped an unexpected %s from the trainer", message.type)

    def _await(self, kinds: tuple[type, ...], timeout_s: float) -> tuple[Any, list]:
        """The next inbox message if it is one of `kinds`, waiting up to `timeout_s` for it.

        Heartbeats go out while waiting, so the trainer knows this worker is alive; anything
        else first in line (a late answer from before a reconnect) is logged and skipped.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            while self.inbox:
                message, blobs = self.inbox.popleft()
                if isinstance(message, kinds):
                    return message, blobs
                log.warning("skipped an unexpected %s from the trainer", message.type)
            now = time.monotonic()
            if now >= deadline or self.stopping:
                raise TrainerGone(f"no answer from the trainer for {timeout_s:.0f}s")
            self._pump(deadline - now)

    def _in_background(self, function: Any, *arguments: Any) -> Any:
        """Run `function` in the engine thread; meanwhile heartbeat and take in messages."""
        future: Future = self.pool.submit(function, *arguments)
        while not future.done():
            self._pump(0.2)
        return future.result()

    def _close(self, reason: str) -> None:
        if self.channel is not None:
            # The trainer may already be gone; then there is nobody to tell.
            with contextlib.suppress(TrainerGone):
                deadline = time.monotonic() + 5.0
                while self.submitted and time.monotonic() < deadline:
                    self._pump(deadline - time.monotonic())  # the last verdicts, for the log
                self._send(m.Bye(reason=reason), timeout_s=1.0)
            self.channel.close(linger_s=2.0)
            self.channel = None
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.context.destroy(linger=0)

    # ---- work ----------------------------------------------------------------------------

    def _serve(self) -> None:
        """Take the next lease or weight update from the inbox, asking for work if it is empty.

        Leases are pipelined: while the engine generates one, the next is already requested
        (see `_work_on`), and submissions do not wait for their verdict."""
        assert self.spec is not None
        while not self.stopping and not self._enough():
            if not self.inbox and not self.requested:
                self._request_work()
            # Weights may be on the way (a big message that arrives all at once): be patient.
            behind = self.version != self.trainer_version
            timeout = WEIGHTS_TIMEOUT_S if behind else self.spec.heartbeat_timeout_s
            message, blobs = self._await(WORK, timeout)
            if isinstance(message, m.WeightUpdate):
                self.trainer_version = max(self.trainer_version, message.version)
                self._apply_weights(message, blobs)
            elif isinstance(message, m.Lease):
                self._work_on(message)
            else:
                self._sleep_with_heartbeats(message.retry_after_s)

    def _request_work(self) -> None:
        self._send(
            m.WorkRequest(
                max_prompts=self.options.max_prompts_per_lease, weights_version=self.version
            )
        )
        self.requested = True

    def _apply_weights(self, update: m.WeightUpdate, blobs: list) -> None:
        """Keyframe or delta -> the replica -> the engine. A failure leaves the engine as it was
        and, for deltas, asks for a keyframe (version -1): the chain cannot go on from here."""
        started = time.monotonic()
        if update.version <= self.version:
            return  # already held: a chain asked for twice
        if len(blobs) != 1:
            log.error("weight update %d came with %d payload frames", update.version, len(blobs))
            return
        try:
            self._in_background(self._replay, update, blobs[0])
        except (PayloadError, ValueError) as error:  # checked before the engine was touched
            log.error("weight update %d (%s) refused: %s", update.version, update.codec, error)
            if update.base_version >= 0:  # a delta: the chain cannot go on from here
                self.version = -1
            return
        except TrainerGone:
            self.version = -1  # the load may still be running: only a keyframe is safe now
            raise
        except Exception:
            log.exception("weight update %d failed half-way; asking for a keyframe", update.version)
            self.version = -1
            return
        self.version, took = update.version, time.monotonic() - started
        size = f"{update.num_bytes / 1e6:.3f} MB"
        log.info(
            "weights now at version %d (%s, %s, %.2fs)", update.version, update.codec, size, took
        )

    def _replay(self, update: m.WeightUpdate, payload: bytes) -> None:
        assert self.replica is not None
        self.backend.load_weights(self.replica.apply(update, payload, self.version))

    def _work_on(self, lease: m.Lease) -> None:
        """Generate (asking for the next lease meanwhile), submit, and move on: the verdict is
        handled whenever it arrives."""
        assert self.spec is not None
        started, version = time.monotonic(), self.version
        deadline = self.deadlines.pop(lease.lease_id, math.inf)
        last = (
            self.options.max_leases is not None and self.leases_done + 1 >= self.options.max_leases
        )
        if not self.requested and not self.inbox and not last:
            self._request_work()  # the engine should not sit idle on the network
        try:
            groups = self._in_background(
                sample_groups, self.backend, lease, self.spec.sampling, self.environment
            )
        except TrainerGone:
            raise
        except Exception:  # the engine failed on this lease: let it expire, keep working
            log.exception(
                "generation failed for lease %s; the trainer will re-lease it", lease.lease_id
            )
            return
        elapsed = time.monotonic() - started
        if self.options.slowdown > 1:
            self._sleep_with_heartbeats((self.options.slowdown - 1) * elapsed)
        if time.monotonic() > deadline:
            log.warning(
                "lease %s passed its deadline; not submitted (leased again)", lease.lease_id
            )
            return
        lease_id = lease.lease_id
        self._send(
            m.Submission(
                lease_id=lease_id, policy_version=version, groups=groups, generation_seconds=elapsed
            )
        )
        tokens = sum(len(c.token_ids) for group in groups for c in group.completions)
        self.submitted[lease.lease_id] = (sum(len(g.completions) for g in groups), tokens, elapsed)
        self.leases_done += 1

    def _verdict(self, reply: m.Accept | m.Reject) -> None:
        self.tally.record(reply, *self.submitted.pop(reply.lease_id))

    def _sleep_with_heartbeats(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and not self.stopping:
            self._pump(left)


def run_worker(options: WorkerOptions, threads: int | None = None) -> None:
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(threads)
    Worker(options).run()
