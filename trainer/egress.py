"""What the trainer may send a peer in weights: bounded in bytes queued, keyframes on a budget.

A keyframe (full weights, hundreds of MB) is the most one small request can make the trainer
send, and ZeroMQ keeps whatever is queued for a peer that does not read, zero-copy: an unread
keyframe pins that version's bytes in the trainer's memory. So every weight payload goes out
tracked (a pyzmq MessageTracker says when libzmq has let go of it), and:

- a peer with a payload still queued is sent no further weights until it reads (at most one
  queued payload per connection, whatever its size);
- a connection gets at most one keyframe per version (a replica that fails to load one waits
  for the next version, or rebuilds from the base weights and the delta chain);
- connections not yet proven honest share a keyframe budget per address (a token bucket:
  `burst` at once, one more every `refill_s`), and among all of them at most one keyframe
  may be queued at a time, so strangers pin at most one old keyframe in all.
`weights_for` decides what a worker asking for work is sent first: nothing new while the
chain it was sent has not arrived (it asked again too early: only what was published since),
the deltas or the keyframe it lacks, or a reason to wait. Bookkeeping with the clock passed
in; the server sends what it says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from swarmrl.protocol import messages as m
from swarmrl.trainer.ledger import WorkerRecord
from swarmrl.trainer.limits import TokenBucket
from swarmrl.trainer.publish import Outgoing, WeightPublisher


@dataclass
class Peer:
    address: str
    queued: list[Any] = field(default_factory=list)  # trackers of unsent weight payloads
    keyframe_version: int = -1  # the newest version it was sent a keyframe of


class Egress:
    def __init__(
        self,
        publisher: WeightPublisher,
        in_flight_s: float,
        burst: int = 2,
        refill_s: float = 10.0,
    ) -> None:
        self.publisher = publisher
        self.in_flight_s = in_flight_s  # a chain sent this recently may still be on its way
        self.burst, self.refill_s = burst, refill_s
        self.peers: dict[bytes, Peer] = {}
        self.address_budgets: dict[str, TokenBucket] = {}
        self.stranger_keyframe: bytes | None = None  # the unproven peer whose keyframe is queued

    def join(self, identity: bytes, address: str) -> None:
        self.peers[identity] = Peer(address)

    def leave(self, identity: bytes) -> None:
        self.peers.pop(identity, None)
        if self.stranger_keyframe == identity:
            self.stranger_keyframe = None

    def busy(self, identity: bytes) -> bool:
        """Whether a weight payload sent to this peer is still queued (it has not read it)."""
        peer = self.peers.get(identity)
        if peer is None:
            return False
        peer.queued = [tracker for tracker in peer.queued if not tracker.done]
        if not peer.queued and self.stranger_keyframe == identity:
            self.stranger_keyframe = None
        return bool(peer.queued)

    def weights_for(
        self, identity: bytes, worker: WorkerRecord, held: int, now: float
    ) -> list[Outgoing] | str | None:
        """What to send a worker that holds version `held` and asks for work: updates; [] for
        nothing now (what it was sent answers it); a reason to wait; None: it is current."""
        worker.weights_version = start = held
        if self.busy(identity):
            return []
        in_flight = now - worker.sent_at < self.in_flight_s
        if 0 <= start < worker.sent_version and in_flight:
            start = worker.sent_version  # it asked before the chain it was sent arrived
        updates = self.publisher.catch_up(start)
        if not updates:
            return [] if start != held else None
        first = updates[0][0]
        if first.base_version < 0:
            why = self.keyframe_refusal(identity, first.version, worker.proven, now)
            if why is not None:
                return why
        worker.sent_version, worker.sent_at = updates[-1][0].version, now
        return updates

    def keyframe_refusal(
        self, identity: bytes, version: int, proven: bool, now: float
    ) -> str | None:
        """Why this peer may not be sent the keyframe of `version` now; None if it may."""
        peer = self.peers[identity]
        if version <= peer.keyframe_version:
            return "this connection was sent the keyframe of this version already"
        if proven:
            return None
        if self.stranger_keyframe is not None and self.busy(self.stranger_keyframe):
            return "another new worker's keyframe is still on its way"
        bucket = self.address_budgets.get(peer.address)
        if bucket is None:
            bucket = TokenBucket(1 / self.refill_s, self.burst, now)
            self.address_budgets[peer.address] = bucket
        if not bucket.take(now):
            return f"keyframes to new workers at {peer.address} are used up for now"
        return None

    def sent(
        self, identity: bytes, worker: WorkerRecord, update: m.WeightUpdate, tracker: Any
    ) -> None:
        """Record a weight payload sent with a tracker."""
        peer = self.peers[identity]
        peer.queued.append(tracker)
        if update.base_version < 0:  # a keyframe
            peer.keyframe_version = max(peer.keyframe_version, update.version)
            if not worker.proven:
                self.stranger_keyframe = identity

    def forget_idle(self, now: float) -> None:
        for address in [a for a, b in self.address_budgets.items() if b.full(now)]:
            del self.address_budgets[address]
