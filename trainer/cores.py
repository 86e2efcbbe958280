"""How the trainer shares one machine's CPU cores with the local workers `swarmrl run` started.

The launcher gives each local worker `swarm.worker_threads` torch threads and the trainer the
rest, at least one: generation and training overlap, and oversubscribed torch threads stall
both (measured: a 13 s train step took 80 s beside two generating workers). With
`swarm.core_split = "follow_bottleneck"`, a step whose successor's groups are all buffered
already (generation is ahead: training is the bottleneck) pauses the local workers' leasing,
waits until the leases they hold have come back, and trains on every core; then the workers
lease again. A step whose successor still needs groups keeps the split, so the workers go on
generating. Remote workers are never paused. (Irrelevant for a trainer on a GPU.) `static` is
the default: on 2 cores the two came out even (docs/training.md has the measurement).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("trainer")

POLL_S = 0.05
LEASE_WAIT_S = 60.0  # a local lease takes seconds; a dead worker's expires by its silence


def takes_the_cores(buffered_groups: int, prompts_per_step: int) -> bool:
    """The next step's groups are all buffered: generating more now only waits for training."""
    return buffered_groups >= prompts_per_step


class CoreSplit:
    def __init__(
        self,
        pause_leasing: Callable[[frozenset[str]], tuple[int, int]],
        set_threads: Callable[[int], None],
        local_workers: frozenset[str],
        prompts_per_step: int,
        all_threads: int,
        shared_threads: int,
        wait_s: float = LEASE_WAIT_S,
    ) -> None:
        """`pause_leasing(workers)` is SwarmServer.pause_leasing; `set_threads` is
        torch.set_num_threads; `wait_s` bounds the wait for the local workers' open leases."""
        self.pause_leasing, self.set_threads = pause_leasing, set_threads
        self.local_workers, self.prompts_per_step = local_workers, prompts_per_step
        self.all_threads, self.shared_threads, self.wait_s = all_threads, shared_threads, wait_s

    @contextmanager
    def for_step(self) -> Iterator[int]:
        """Around one batch's optimizer steps; yields the trainer's thread count for them."""
        threads = self.shared_threads
        if self._take_cores():
            threads = self.all_threads
            self.set_threads(threads)
        try:
            yield threads
        finally:
            if threads != self.shared_threads:
                self.set_threads(self.shared_threads)
            self.pause_leasing(frozenset())

    def _take_cores(self) -> bool:
        """Pause the local workers if training is the bottleneck, and wait until they are
        idle; False (and leasing as before) otherwise, or if a lease is still out after
        `wait_s` (a worker stuck mid-lease would share the cores: no oversubscription)."""
        buffered, held = self.pause_leasing(self.local_workers)
        if not takes_the_cores(buffered, self.prompts_per_step):
            self.pause_leasing(frozenset())
            return False
        deadline = time.monotonic() + self.wait_s
        while held and time.monotonic() < deadline:
            time.sleep(POLL_S)
            _, held = self.pause_leasing(self.local_workers)
        if held:
            log.debug("local workers still hold %d leases: training on shared cores", held)
            self.pause_leasing(frozenset())
            return False
        return True
