"""Which prompts are out with which worker: admitting, issuing, closing, expiring, re-issuing.

The prompt stream is an index sequence (item i of the task source). A lease hands a worker a
few prompt indices, each with the sampling seed the trainer chose. A lease ends in one of three
ways: the worker submits it (closed), the worker goes silent or the deadline passes (expired),
or the submission is rejected. Expired and rejected prompts go to the front of the queue and are
leased again, so no prompt is lost; `state()`/`restore()` carry this across a trainer restart.
Pure bookkeeping with the clock passed in, so it is unit-tested without sockets or sleeps.

Admission (`offer`) decides whether a worker asking for work gets a lease: at most
`max_open_leases` open per worker, and only as many prompts out (leased or buffered) as can
still be trained on within the staleness limit (`room`). Workers not yet proven honest hold
one lease at a time and share at most half the room (at least a step's worth), and their
leases do not count against the room of proven workers: strangers that take leases and never
submit cannot starve the swarm. A worker asking ahead (it holds a lease) waits while an idle
one was lately refused for lack of room (`WaitingWorkers`), so the room a submission frees
goes to an idle engine rather than a busy one.

Every operation a message triggers is O(1) in the number of workers and open leases: counts are
kept as leases open and close, and since every lease gets the same timeout from a clock that
never goes back, open leases sit in deadline order and expiry reads only the due ones.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from swarmrl.base.config import Config
from swarmrl.protocol import messages as m
from swarmrl.protocol.refusals import Refused

WAITING_WINDOW_S = 2.0  # a refusal older than this: that worker stopped asking
DEFER_PROMPTS = 32  # fresh prompts leased before a deferred one comes back


@dataclass
class OpenLease:
    lease_id: str
    worker_id: str
    prompt_indices: list[int]
    seeds: list[int]
    policy_version: int
    deadline: float
    proven: bool = True  # its worker had been proven honest when it was issued


def prompt_id(index: int) -> str:
    return f"p{index}"


@dataclass(frozen=True)
class NoRoom:
    """No lease for now (not a refusal): the worker asks again after a while."""

    reason: str


class LeaseBook:
    def __init__(
        self,
        seed: int,
        lease_timeout_s: float,
        id_prefix: str | None = None,
        max_open_leases: int = 3,
        room: int = 8,
        newcomer_room: int = 4,
    ) -> None:
        self.seed = seed
        self.lease_timeout_s = lease_timeout_s
        self.max_open_leases = max_open_leases
        self.room = room  # prompts that may be out at once, leased or buffered
        self.newcomer_room = newcomer_room  # of which leased to workers not yet proven
        self.waiting = WaitingWorkers(WAITING_WINDOW_S)
        self.next_index = 0
        self.requeued: deque[int] = deque()
        self.deferred: deque[tuple[int, int]] = deque()  # (prompt, when next_index reaches)
        self.open: dict[str, OpenLease] = {}  # in deadline order
        self.by_worker: dict[str, dict[str, OpenLease]] = {}
        self.outstanding = 0  # prompts in open leases
        self.outstanding_newcomers = 0  # of which leased to workers not yet proven
        self.attempts: dict[int, int] = {}  # only prompts that were re-queued
        self.paused: frozenset[str] = frozenset()  # leased nothing for now (cores.py)
        self._ids = itertools.count(1)
        # Lease ids differ between trainer restarts, so a pre-restart lease never matches.
        self._prefix = f"L{secrets.token_hex(3)}-" if id_prefix is None else id_prefix

    @classmethod
    def from_config(cls, config: Config) -> LeaseBook:
        """Lease only what can still be trained on: the groups of the step in progress are out
        of the buffer, so `max_staleness` more steps' worth is the most that stays fresh."""
        trainer = config.trainer
        room = trainer.prompts_per_step * max(trainer.max_staleness, 1)
        return cls(
            config.data.seed,
            config.swarm.lease_timeout_s,
            max_open_leases=config.swarm.max_open_leases,
            room=room,
            newcomer_room=max(trainer.prompts_per_step, room // 2),
        )

    def message(
        self, lease: OpenLease, prompt: Callable[[int], tuple[str, list[int]]], generations: int
    ) -> m.Lease:
        """The Lease a worker is sent: each prompt's tokens (`prompt(i)` gives (text, ids))
        with its seed, and the timeout every lease gets."""
        prompts = [
            m.LeasePrompt(prompt_id=prompt_id(i), token_ids=prompt(i)[1], seed=seed)
            for i, seed in zip(lease.prompt_indices, lease.seeds, strict=True)
        ]
        return m.Lease(
            lease_id=lease.lease_id,
            policy_version=lease.policy_version,
            num_generations=generations,
            prompts=prompts,
            deadline_s=self.lease_timeout_s,
        )

    def held(self, worker_id: str) -> int:
        """How many leases `worker_id` has open."""
        return len(self.by_worker.get(worker_id, ()))

    def offer(
        self,
        worker_id: str,
        wanted: int,
        policy_version: int,
        buffered: int,
        now: float,
        proven: bool = True,
    ) -> OpenLease | NoRoom:
        """A lease of up to `wanted` prompts, or NoRoom; Refused if the worker holds too many.

        `buffered`: groups waiting for the optimizer (they count against the room too: the
        step in progress has taken its own out already). `proven`: the worker's groups have
        passed the trainer's log-prob check."""
        held = self.held(worker_id)
        if held >= self.max_open_leases:
            detail = f"{held} leases open (at most {self.max_open_leases})"
            raise Refused("too_many_leases", detail)
        if worker_id in self.paused:
            return NoRoom("the trainer is training on this machine's cores")
        if held and not proven:
            return NoRoom("a new worker holds one lease at a time until its work is checked")
        room = self.room - self.outstanding - buffered
        if proven:
            room += self.outstanding_newcomers
        else:
            room = min(room, self.newcomer_room - self.outstanding_newcomers)
        if room <= 0:
            if not held:
                self.waiting.refused(worker_id, now)
            return NoRoom("enough work is out")
        if held and self.waiting.others(worker_id, now):
            return NoRoom("an idle worker goes first")
        self.waiting.discard(worker_id)
        return self.issue(worker_id, min(wanted, room), policy_version, now, proven)

    def issue(
        self, worker_id: str, count: int, policy_version: int, now: float, proven: bool = True
    ) -> OpenLease:
        indices = []
        while len(indices) < count:
            if self.requeued:
                indices.append(self.requeued.popleft())
            elif self.deferred and self.deferred[0][1] <= self.next_index:
                indices.append(self.deferred.popleft()[0])
            else:
                indices.append(self.next_index)
                self.next_index += 1
        seeds = [self._seed(index) for index in indices]
        lease = OpenLease(
            lease_id=f"{self._prefix}{next(self._ids)}",
            worker_id=worker_id,
            prompt_indices=indices,
            seeds=seeds,
            policy_version=policy_version,
            deadline=now + self.lease_timeout_s,
            proven=proven,
        )
        self.open[lease.lease_id] = lease
        self.by_worker.setdefault(worker_id, {})[lease.lease_id] = lease
        self.outstanding += count
        if not proven:
            self.outstanding_newcomers += count
        return lease

    def _seed(self, index: int) -> int:
        """A seed per (prompt, attempt): a re-issued prompt is not sampled identically."""
        attempt = self.attempts.get(index, 0)
        return (self.seed * 1_000_003 + index * 7_919 + attempt) % (2**31 - 1)

    def close(self, lease_id: str, worker_id: str, now: float) -> OpenLease:
        """Take an open lease out of the book for its submission, or raise Refused."""
        lease = self.open.get(lease_id)
        if lease is None:
            raise Refused("unknown_lease", f"lease {lease_id} is not open (expired or done)")
        if lease.worker_id != worker_id:
            raise Refused("not_your_lease", f"lease {lease_id} belongs to another worker")
        if now > lease.deadline:
            self._expire([lease])
            raise Refused("lease_expired", f"lease {lease_id} passed its deadline")
        self._remove(lease)
        return lease

    def _remove(self, lease: OpenLease) -> None:
        del self.open[lease.lease_id]
        held = self.by_worker[lease.worker_id]
        del held[lease.lease_id]
        if not held:
            del self.by_worker[lease.worker_id]
        self.outstanding -= len(lease.prompt_indices)
        if not lease.proven:
            self.outstanding_newcomers -= len(lease.prompt_indices)

    def defer(self, indices: list[int]) -> None:
        """Lease these prompts again, but only after `DEFER_PROMPTS` fresh ones: a group with
        no reward spread from a worker not yet proven honest proves nothing, and handing the
        same prompts straight back would keep that worker on them."""
        for index in indices:
            self.deferred.append((index, self.next_index + DEFER_PROMPTS))
            self.attempts[index] = self.attempts.get(index, 0) + 1

    def requeue(self, indices: list[int]) -> None:
        """Put prompts back at the front of the stream (rejected or stale results)."""
        for index in reversed(indices):
            self.requeued.appendleft(index)
            self.attempts[index] = self.attempts.get(index, 0) + 1

    def expire_due(self, now: float) -> list[OpenLease]:
        due = list(itertools.takewhile(lambda lease: now > lease.deadline, self.open.values()))
        return self._expire(due)

    def expire_worker(self, worker_id: str) -> list[OpenLease]:
        """A worker that left or was quarantined: its leases' prompts go back in the queue."""
        self.waiting.discard(worker_id)
        return self._expire(list(self.by_worker.get(worker_id, {}).values()))

    def _expire(self, leases: list[OpenLease]) -> list[OpenLease]:
        """Close these leases and put their prompts back, oldest prompt first."""
        for lease in leases:
            self._remove(lease)
        self.requeue(sorted(i for lease in leases for i in lease.prompt_indices))
        return leases

    def state(self) -> dict:
        """What a checkpoint needs: open leases count as not yet done."""
        pending = [i for lease in self.open.values() for i in lease.prompt_indices]
        attempts = dict(self.attempts)
        for index in pending:  # re-issued after a restart, so sampled with a new seed
            attempts[index] = attempts.get(index, 0) + 1
        return {
            "next_index": self.next_index,
            "requeued": pending + list(self.requeued) + [i for i, _ in self.deferred],
            "attempts": {str(k): v for k, v in attempts.items()},
        }

    def restore(self, state: dict) -> None:
        self.next_index = int(state["next_index"])
        self.requeued = deque(int(i) for i in state["requeued"])
        self.deferred.clear()
        self.attempts = {int(k): int(v) for k, v in state["attempts"].items()}
        self.open.clear()
        self.by_worker.clear()
        self.outstanding = self.outstanding_newcomers = 0


class WaitingWorkers:
    """Workers that hold no lease and were lately refused one for lack of room, oldest refusal
    first. While one waits, a worker asking ahead (it holds a lease) is refused too, so the room
    the next submission frees goes to an idle engine rather than a busy one."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._since: dict[str, float] = {}

    def refused(self, worker_id: str, now: float) -> None:
        self._since.pop(worker_id, None)
        self._since[worker_id] = now

    def discard(self, worker_id: str) -> None:
        self._since.pop(worker_id, None)

    def others(self, worker_id: str, now: float) -> bool:
        """Whether a worker other than `worker_id` is waiting for room."""
        while self._since:
            oldest, since = next(iter(self._since.items()))
            if now - since <= self.window_s:
                break
            del self._since[oldest]
        return len(self._since) > 1 or (bool(self._since) and worker_id not in self._since)
