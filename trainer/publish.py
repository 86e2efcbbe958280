"""What the trainer tells a worker so that it holds the current weights: deltas or a keyframe.

The training thread `publish`es every new version: for compressed codecs the delta that
turns version v-1 into v, and now and then a keyframe (the full published weights, codec
`full`; every version for the `full` codec). The network
thread asks `catch_up(worker_version)` before each lease: a worker one or a few versions
behind gets the chain of deltas it missed (each with the fingerprint of the weights it must
end up with), and so does a worker that lost its copy (-1) while the chain from the base
weights (version 0) is still kept; a worker that joins late, is too far behind, reconnected
to a new run, or crossed a `keyframe_every` boundary gets the keyframe. A worker the deltas
cannot take there gets the newest keyframe and the deltas since. The last `history` deltas
are kept: they are small (kilobytes for `demo`); one keyframe is the only big thing held.
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
    keyframe: bytes | None  # codec `full`: the whole published weights, when this version has one
    delta: Delta | None = None  # from version - 1; None when only keyframes are sent


Outgoing = tuple[m.WeightUpdate, tuple[bytes, ...]]


class WeightPublisher:
    def __init__(
        self,
        first: Published,
        history: int = 64,
        keyframe_every: int = 0,
        base_is_version_0: bool = True,
    ) -> None:
        self.history = history
        self.keyframe_every = keyframe_every
        # Version 0 is the model folder's weights a worker can read itself (not with LoRA,
        # whose published weights are adapters a worker only gets from the trainer).
        self.base_is_version_0 = base_is_version_0
        if first.keyframe is None:
            raise ValueError("the first published version needs a keyframe")
        self._current = self._keyframe = first
        self._deltas: OrderedDict[int, tuple[Delta, str]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return self._current.version

    def publish(self, published: Published) -> None:
        with self._lock:
            chained = published.delta is not None and published.version == self.version + 1
            if not chained and published.keyframe is None:
                raise ValueError(f"version {published.version} has neither a delta nor a keyframe")
            if chained:
                assert published.delta is not None
                self._deltas[published.version] = (published.delta, published.fingerprint)
                while len(self._deltas) > self.history:
                    self._deltas.popitem(last=False)
            else:
                self._deltas.clear()  # a chain with a gap is useless
            if published.keyframe is not None:
                self._keyframe = published
            self._current = published

    def catch_up(self, worker_version: int) -> list[Outgoing]:
        """The updates that take a worker from `worker_version` to the current version: the
        deltas it missed, or the newest keyframe and the deltas since."""
        with self._lock:
            current, keyframe, deltas = self._current, self._keyframe, dict(self._deltas)
        if worker_version == current.version:
            return []
        # A worker without a copy (-1) can rebuild one from the base weights (version 0) and
        # the whole chain, when it is still kept: far cheaper than a keyframe.
        start = max(worker_version, 0) if self.base_is_version_0 else worker_version
        missed = range(start + 1, current.version + 1)
        chain_ok = start >= 0 and bool(missed) and all(v in deltas for v in missed)
        if chain_ok and not any(self.keyframe_due(v) for v in missed):
            return self._chain(missed, deltas)
        assert keyframe.keyframe is not None
        full = m.WeightUpdate(
            version=keyframe.version,
            codec="full",
            fingerprint=keyframe.fingerprint,
            num_bytes=len(keyframe.keyframe),
        )
        since = range(keyframe.version + 1, current.version + 1)
        return [(full, (keyframe.keyframe,)), *self._chain(since, deltas)]

    @staticmethod
    def _chain(versions: range, deltas: dict[int, tuple[Delta, str]]) -> list[Outgoing]:
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
            for v in versions
        ]

    def keyframe_due(self, version: int) -> bool:
        """Whether version `version` must have a keyframe: `keyframe_every` says so."""
        return self.keyframe_every > 0 and version % self.keyframe_every == 0
