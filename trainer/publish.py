"""What the trainer tells a worker so that it holds the current weights: deltas or a keyframe.

The training thread `publish`es every new version: a keyframe (the full published weights,
codec `full`) and, for compressed codecs, the delta that turns version v-1 into v. The network
thread asks `catch_up(worker_version)` before each lease: a worker one or a few versions
behind gets the chain of deltas it missed (each with the fingerprint of the weights it must
end up with); a worker that joins late, is too far behind, reconnected to a new run, or
crossed a `keyframe_every` boundary gets the keyframe. The last `history` deltas are kept:
they are small (kilobytes for `demo`), the keyframe is the only big thing held.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from swarmrl.protocol import messages as m


@dataclass(frozen=True)
class Delta:
    codec: str
    payload: bytes


@dataclass(frozen=True)
class Published:
    version: int
    fingerprint: str  # of the weights a worker holds after applying this version
    keyframe: bytes  # codec `full`: the whole published weights
    delta: Delta | None = None  # from version - 1; None when only keyframes are sent


Outgoing = tuple[m.WeightUpdate, tuple[bytes, ...]]


class WeightPublisher:
    def __init__(self, first: Published, history: int = 64, keyframe_every: int = 0) -> None:
        self.history = history
        self.keyframe_every = keyframe_every
        self._current = first
        self._deltas: OrderedDict[int, tuple[Delta, str]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return self._current.version

    def publish(self, published: Published) -> None:
        with self._lock:
            if published.delta is None or published.version != self._current.version + 1:
                self._deltas.clear()  # a chain with a gap is useless
            else:
                self._deltas[published.version] = (published.delta, published.fingerprint)
                while len(self._deltas) > self.history:
                    self._deltas.popitem(last=False)
            self._current = published

    def catch_up(self, worker_version: int) -> list[Outgoing]:
        """The updates that take a worker from `worker_version` to the current version."""
        with self._lock:
            current, deltas = self._current, dict(self._deltas)
        if worker_version == current.version:
            return []
        missed = range(worker_version + 1, current.version + 1)
        chain_ok = worker_version >= 0 and all(v in deltas for v in missed)
        if chain_ok and not any(self._keyframe_due(v) for v in missed):
            return [
                (
                    m.WeightUpdate(
                        version=v,
                        codec=deltas[v][0].codec,
                        fingerprint=deltas[v][1],
                        num_bytes=len(deltas[v][0].payload),
                        base_version=v - 1,
                    ),
                    (deltas[v][0].payload,),
                )
                for v in missed
            ]
        keyframe = m.WeightUpdate(
            version=current.version,
            codec="full",
            fingerprint=current.fingerprint,
            num_bytes=len(current.keyframe),
        )
        return [(keyframe, (current.keyframe,))]

    def _keyframe_due(self, version: int) -> bool:
        return self.keyframe_every > 0 and version % self.keyframe_every == 0
