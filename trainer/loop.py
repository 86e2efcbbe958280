"""The GRPO training run, top to bottom: load, evaluate, serve the swarm, train, save, evaluate.

The trainer never generates during training. Workers pull leases from the server thread and
return completions; this loop waits until `prompts_per_step` groups with a reward spread are
buffered, takes one optimizer step on them, publishes the new weights (version = step: a delta
in the run's codec plus a keyframe for workers that cannot replay it), logs, and checkpoints.
A slow worker only means fewer samples from it; nobody waits for it. The first Ctrl-C
finishes the current step, saves a checkpoint and stops; a second one aborts. Under torchrun
every rank runs this function; rank 0 alone serves the swarm (swarm.py, ranks.py).
(This module imports torch: the CLI imports it only when a run starts.)
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from swarmrl.base.config import Config
from swarmrl.trainer.ranks import make_ranks
from swarmrl.trainer.run import TrainingRun
from swarmrl.trainer.swarm import NoSwarm, Swarm

log = logging.getLogger("trainer")


def train(
    config: Config,
    run_folder: Path,
    resume: bool = False,
    on_ready: Callable[[str], None] | None = None,
    local_workers: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Run training; `on_ready(endpoint)` is called once workers can connect; `local_workers`
    (started by `swarmrl run`) share this machine's cores with it. Returns a summary."""
    trainer = config.trainer
    ranks = make_ranks(config)
    all_threads = torch.get_num_threads()  # when no worker is generating: eval, cores.py
    torch.manual_seed(trainer.seed)
    run = TrainingRun.load(config, run_folder, ranks, resume)
    if config.eval.before:  # measured before any worker competes for the machine
        run.evaluate("before")
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    first = ranks.full_weights(run.model)
    swarm = (
        Swarm.start(run, first, on_ready, local_workers, all_threads)
        if ranks.is_main
        else NoSwarm()
    )
    del first
    stop = StopRequest()
    deadline = (
        math.inf if trainer.max_minutes is None else time.monotonic() + 60 * trainer.max_minutes
    )
    try:
        while True:
            done = run.step >= trainer.max_steps or time.monotonic() >= deadline or bool(stop)
            batch = None if done else swarm.next_batch(run)
            batch, done = ranks.share_batch(batch, done)  # rank 0 decides for every rank
            if done:
                break
            if batch is None:
                continue
            # num_iterations > 1: the ratio's base over the batch's iterations
            old: dict[int, list[float]] | None = {} if trainer.num_iterations > 1 else None
            with swarm.cores_for_step() as threads:
                for iteration in range(min(trainer.num_iterations, trainer.max_steps - run.step)):
                    step_started = time.monotonic()
                    stats, mismatches = ranks.step(run, batch, old)
                    stats["trainer_threads"] = threads
                    run.step += 1  # every iteration is a version the workers are sent
                    weights = ranks.full_weights(run.model)
                    charged = mismatches if iteration == 0 else []  # the same sequences again
                    swarm.after_step(run, stats, charged, batch, weights, step_started)
                    if run.checkpoint_due():
                        run.save(swarm.lease_state(), weights)
        if not stop:
            swarm.hand_over(config.swarm.hand_over_s)
    finally:
        stop.restore()
        workers = swarm.stop(run)
    interrupted = ranks.agree(bool(stop))
    if interrupted:
        log.warning("stopped by Ctrl-C at step %d", run.step)
    if run.step != run.saved_step:  # else nothing was trained since: that checkpoint is final
        run.save(swarm.lease_state())
    if config.eval.after and not interrupted:
        torch.set_num_threads(all_threads)  # the workers have nothing to do any more
        run.evaluate("after")
    return run.finish(workers, interrupted)


class StopRequest:
    """First SIGINT or SIGTERM: finish the step in progress, then stop. Second: abort at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing this step, then saving (again to abort)")

    def __bool__(self) -> bool:
        return self.requested

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
