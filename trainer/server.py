"""The trainer's network side: one thread that owns the ZeroMQ ROUTER and talks to every worker.

It answers hello with the run spec, sends newer weights to a worker before its next lease,
leases prompts (pull-based: a worker asks when it is free, so fast workers ask often and slow
ones rarely), checks and scores submissions, and puts scored groups in the buffer the training
thread reads. It never waits for a worker: a silent worker's leases expire and are leased again.
The training thread talks to it only through `weights` (a WeightPublisher), `next_batch`,
`take_rewards` and `worker_table`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from swarmrl.config import Config
from swarmrl.protocol import messages as m
from swarmrl.protocol.framing import ProtocolError, decode
from swarmrl.protocol.transport import bound_endpoint, make_router, recv_from, send_to
from swarmrl.rewards import score_completions
from swarmrl.trainer.buffer import GroupBuffer, ScoredGroup
from swarmrl.trainer.data import prompt_text, prompt_token_ids
from swarmrl.trainer.leases import LeaseBook, LeaseError, OpenLease, prompt_id
from swarmrl.trainer.publish import WeightPublisher
from swarmrl.trainer.verify import SubmissionError, check_submission

log = logging.getLogger("trainer")


@dataclass
class WorkerRecord:
    worker_id: str
    backend: str = ""
    max_prompts: int = 1
    last_seen: float = 0.0
    weights_version: int = -1
    accepted_groups: int = 0
    accepted_samples: int = 0
    rejected: int = 0
    connected: bool = True
    reject_reasons: dict[str, int] = field(default_factory=dict)


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
        self.tokenizer = tokenizer
        self.tasks = tasks
        self.reward_functions = reward_functions
        self.leases = leases
        self.buffer = GroupBuffer()
        self.run_id = run_id
        self.workers: dict[bytes, WorkerRecord] = {}  # connected, by ZeroMQ identity
        self.ledger: dict[str, WorkerRecord] = {}  # every worker ever seen, by worker id
        self.reward_log: list[float] = []  # every scored sample's reward since the last snapshot
        self.weights = weights
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = make_router(
            self._context, config.swarm.bind, config.swarm.max_message_mb * 2**20,
            allow_keys=config.swarm.allow_keys, trainer_key=config.swarm.trainer_key,
        )  # fmt: skip
        self.endpoint = bound_endpoint(self._socket)
        self._thread = threading.Thread(target=self._serve, name="swarm-server", daemon=True)
        self._names = 0
        self._prompt_cache: dict[int, tuple[str, list[int]]] = {}

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
            rewards, self.reward_log = self.reward_log, []
            return rewards

    def worker_table(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                w.worker_id: {
                    "samples": w.accepted_samples,
                    "rejected": w.rejected,
                    "connected": w.connected,
                    "reasons": dict(w.reject_reasons),
                }
                for w in self.ledger.values()
            }

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
        while not self._stop.is_set():
            received = recv_from(self._socket, timeout_s=interval)
            now = time.monotonic()
            with self._lock:
                if received is not None:
                    identity, frames = received
                    try:
                        self._handle(identity, frames, now)
                    except Exception:  # one bad message must not take the swarm down
                        log.exception("error handling a message from %s", identity.hex()[:8])
                        self._refuse(identity, None, "internal", "the trainer failed on this")
                # Only judge silence once every queued message has been read: after a slow
                # step, waiting heartbeats must count before anyone is declared gone.
                if not self._socket.poll(0):
                    self._expire(now)

    def _send(self, identity: bytes, message: Any, blobs: tuple = ()) -> None:
        send_to(self._socket, identity, message, blobs)

    def _refuse(self, identity: bytes, lease_id: str | None, reason: str, detail: str) -> None:
        detail = detail[: m.MAX_REASON_CHARS]
        self._send(identity, m.Reject(lease_id=lease_id, reason=reason, detail=detail))

    def _handle(self, identity: bytes, frames: list, now: float) -> None:
        try:
            message, _ = decode(frames, max_blobs=0)
        except ProtocolError as error:
            log.warning("malformed message from %s: %s", identity.hex()[:8], error)
            self._refuse(identity, None, error.reason, str(error))
            return
        if isinstance(message, m.Hello):
            self._hello(identity, message, now)
            return
        worker = self.workers.get(identity)
        if worker is None:
            self._refuse(identity, None, "unknown_worker", "send hello first")
            return
        worker.last_seen = now
        if isinstance(message, m.WorkRequest):
            self._work(identity, worker, message, now)
        elif isinstance(message, m.Submission):
            self._submission(identity, worker, message, now)
        elif isinstance(message, m.Heartbeat):
            worker.weights_version = message.weights_version
            self._send(identity, m.Heartbeat(sent_at=time.time(), weights_version=self.version))
        elif isinstance(message, m.Bye):
            self._drop(identity, f"said bye ({message.reason})")
        else:
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
        name = hello.worker_name[:100] or "worker"  # room for a -N suffix within the id limit
        worker_id = name
        while worker_id in connected:
            self._names += 1
            worker_id = f"{name}-{self._names}"
        record = self.ledger.setdefault(worker_id, WorkerRecord(worker_id=worker_id))
        record.backend, record.max_prompts = hello.backend, hello.max_prompts_per_lease
        record.last_seen, record.weights_version = now, hello.weights_version
        record.connected = True
        self.workers[identity] = record
        log.info(
            "%s joined (%s backend, up to %d prompts per lease)",
            worker_id,
            hello.backend,
            hello.max_prompts_per_lease,
        )
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
        worker.weights_version = request.weights_version
        updates = self.weights.catch_up(request.weights_version)
        if updates:  # the worker asks again once it holds the current weights
            for update, payload in updates:
                self._send(identity, update, payload)
            return
        # Lease only what can still be trained on: the groups of the step in progress are out
        # of the buffer, so `max_staleness` more steps' worth is the most that stays fresh.
        trainer = self.config.trainer
        limit = trainer.prompts_per_step * max(trainer.max_staleness, 1)
        room = limit - self.leases.outstanding_prompts() - len(self.buffer)
        count = min(request.max_prompts, worker.max_prompts, self.config.swarm.prompts_per_lease)
        if room <= 0:
            self._send(identity, m.NoWork(reason="enough work is out", retry_after_s=0.5))
            return
        lease = self.leases.issue(worker.worker_id, min(count, room), self.version, now)
        prompts = [
            m.LeasePrompt(prompt_id=prompt_id(i), token_ids=self._prompt(i)[1], seed=seed)
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

    def _prompt(self, index: int) -> tuple[str, list[int]]:
        cached = self._prompt_cache.get(index)
        if cached is None:
            text = prompt_text(self.config.data, self.tokenizer, self.tasks.train(index).question)
            cached = (text, prompt_token_ids(self.config.data, self.tokenizer, text))
            self._prompt_cache[index] = cached
        return cached

    def _submission(
        self, identity: bytes, worker: WorkerRecord, sub: m.Submission, now: float
    ) -> None:
        try:
            lease = self.leases.close(sub.lease_id, worker.worker_id, now)
        except LeaseError as error:
            self._reject(identity, worker, sub.lease_id, error.reason, error.detail)
            return
        try:
            texts = check_submission(sub, lease, self.config, self.version, self.tokenizer)
            groups = self._score(lease, sub, texts, worker.worker_id)
        except SubmissionError as error:
            self.leases.requeue(lease.prompt_indices)
            self._reject(identity, worker, sub.lease_id, error.reason, error.detail)
            return
        except Exception:
            self.leases.requeue(lease.prompt_indices)  # the lease is closed: keep its prompts
            raise
        useful = 0
        for group in groups:
            self._prompt_cache.pop(group.prompt_index, None)
            if group.has_signal():
                self.buffer.put(group)
                useful += 1
        samples = sum(len(g.rewards) for g in groups)
        worker.accepted_groups += len(groups)
        worker.accepted_samples += samples
        self._send(identity, m.Accept(lease_id=sub.lease_id, accepted_groups=len(groups)))
        log.debug(
            "lease %s (%s) accepted from %s: %d samples, %d/%d groups with reward spread",
            sub.lease_id,
            ",".join(g.prompt_id for g in sub.groups),
            worker.worker_id,
            samples,
            useful,
            len(groups),
        )

    def _score(
        self, lease: OpenLease, sub: m.Submission, texts: list[list[str]], worker_id: str
    ) -> list[ScoredGroup]:
        prompts, completions, columns = [], [], {"answer": []}
        for index, group_texts in zip(lease.prompt_indices, texts, strict=True):
            task = self.tasks.train(index)
            for text in group_texts:
                prompts.append(self._prompt(index)[0])
                completions.append(text)
                columns["answer"].append(task.answer)
                for key, value in task.columns.items():
                    columns.setdefault(key, []).append(value)
        columns["completion_ids"] = [c.token_ids for g in sub.groups for c in g.completions]
        scores = score_completions(self.reward_functions, prompts, completions, columns)
        self.reward_log.extend(scores.total)
        size = self.config.sampling.num_generations
        groups = []
        for k, (index, group) in enumerate(zip(lease.prompt_indices, sub.groups, strict=True)):
            groups.append(
                ScoredGroup(
                    prompt_index=index,
                    prompt_token_ids=self._prompt(index)[1],
                    completion_token_ids=[c.token_ids for c in group.completions],
                    behavior_logprobs=[c.logprobs for c in group.completions],
                    rewards=scores.total[k * size : (k + 1) * size],
                    worker_id=worker_id,
                    policy_version=sub.policy_version,
                )
            )
        return groups

    def _reject(
        self, identity: bytes, worker: WorkerRecord, lease_id: str, reason: str, detail: str
    ) -> None:
        worker.rejected += 1
        worker.reject_reasons[reason] = worker.reject_reasons.get(reason, 0) + 1
        log.warning("%s: lease %s rejected: %s (%s)", worker.worker_id, lease_id, reason, detail)
        self._refuse(identity, lease_id, reason, detail)

    def _drop(self, identity: bytes, why: str) -> None:
        worker = self.workers.pop(identity)
        worker.connected = False
        lost = self.leases.expire_worker(worker.worker_id)
        count = sum(len(lease.prompt_indices) for lease in lost)
        log.info(
            "%s left: %s; %d leased prompts go back in the queue", worker.worker_id, why, count
        )

    def _expire(self, now: float) -> None:
        timeout = self.config.swarm.heartbeat_timeout_s
        for identity in [i for i, w in self.workers.items() if now - w.last_seen > timeout]:
            self._drop(identity, f"silent for more than {timeout:.0f}s")
        for lease in self.leases.expire_due(now):
            log.info(
                "lease %s of %s expired; %d prompts leased again",
                lease.lease_id,
                lease.worker_id,
                len(lease.prompt_indices),
            )
