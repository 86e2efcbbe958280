"""Scored groups waiting for the optimizer, and the rule for which of them may still be used.

The network thread puts verified, scored groups in; the training thread takes
`prompts_per_step` of them at a time. A group whose reward spread is zero carries no GRPO signal
and never enters. A group sampled more than `max_staleness` policy versions ago is handed back
(its prompt is leased again) instead of being trained on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ScoredGroup:
    """One prompt's `num_generations` completions, as the trainer verified and scored them."""

    prompt_index: int
    prompt_token_ids: list[int]
    completion_token_ids: list[list[int]]
    behavior_logprobs: list[list[float]]
    rewards: list[float]
    worker_id: str
    policy_version: int
    truncated: list[bool] = field(default_factory=list)  # cut off at the length limit
    # Episodes: model, environment, model, ... token counts per completion ([] single-turn).
    turn_lengths: list[list[int]] = field(default_factory=list)

    def has_signal(self) -> bool:
        return max(self.rewards) > min(self.rewards)


class GroupBuffer:
    def __init__(self) -> None:
        self._groups: deque[ScoredGroup] = deque()
        self._ready = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._ready:
            return len(self._groups)

    def put(self, group: ScoredGroup) -> None:
        with self._ready:
            self._groups.append(group)
            self._ready.notify_all()

    def close(self) -> None:
        """Wake any waiting `take` so the trainer can shut down."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def take(
        self,
        count: int,
        current_version: int,
        max_staleness: int,
        timeout_s: float,
        minimum: int | None = None,
    ) -> tuple[list[ScoredGroup] | None, list[ScoredGroup]]:
        """Wait for `count` fresh groups, or settle for `minimum` (of up to `count`). Returns
        (batch or None on timeout/close, stale groups)."""
        minimum = count if minimum is None else minimum
        stale: list[ScoredGroup] = []
        deadline = time.monotonic() + timeout_s
        with self._ready:
            while True:
                fresh: deque[ScoredGroup] = deque()
                for group in self._groups:
                    too_old = current_version - group.policy_version > max_staleness
                    (stale if too_old else fresh).append(group)
                self._groups = fresh
                if len(fresh) >= minimum:
                    return [fresh.popleft() for _ in range(min(count, len(fresh)))], stale
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0 or not self._ready.wait(remaining):
                    return None, stale

    def put_back(self, groups: list[ScoredGroup]) -> None:
        """Return groups taken out to the front of the buffer, in their order."""
        with self._ready:
            self._groups.extendleft(reversed(groups))
            self._ready.notify_all()

    def drop_worker(self, worker_id: str) -> list[ScoredGroup]:
        """Take out every group of `worker_id` (a quarantined worker) and return them."""
        with self._ready:
            dropped = [g for g in self._groups if g.worker_id == worker_id]
            self._groups = deque(g for g in self._groups if g.worker_id != worker_id)
            return dropped

    def take_where(self, wanted: Callable[[ScoredGroup], bool]) -> list[ScoredGroup]:
        """Take out the groups `wanted` says yes to, in their order, and return them."""
        with self._ready:
            taken = [g for g in self._groups if wanted(g)]
            self._groups = deque(g for g in self._groups if not wanted(g))
            return taken

    def peek(self) -> list[ScoredGroup]:
        with self._ready:
            return list(self._groups)
