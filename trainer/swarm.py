"""Rank 0's side of a run: the swarm server, each version's publication, progress and metrics.

`Swarm.start` brings the server up (with the run's codec and reward functions) and the live
dashboard (dashboard.py), and tells the launcher where workers connect. `next_batch` waits for
a step's groups (the server screens those of workers not yet proven honest with the log-prob
check, when this process holds the whole model); `after_step` charges the sequences the step
masked out, publishes the new version and writes the step's metrics, its time split into
waiting for samples, training and publishing. At the end, `hand_over` waits (bounded) until the
connected workers hold the final weights; after `stop` the dashboard shows the run folder until
the process exits. The other ranks of a torchrun job get `NoSwarm`, which has the same calls and
does nothing.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from swarmrl.protocol.codecs import codec_for
from swarmrl.rewards import load_reward_function
from swarmrl.trainer.buffer import ScoredGroup
from swarmrl.trainer.contributions import ContributionLedger
from swarmrl.trainer.cores import CoreSplit
from swarmrl.trainer.dashboard import Dashboard, serve_run
from swarmrl.trainer.leases import prompt_id
from swarmrl.trainer.ledger import write_ledger
from swarmrl.trainer.logprob_check import LogprobMismatch
from swarmrl.trainer.optimizers import Publication
from swarmrl.trainer.progress import Progress, waiting_for
from swarmrl.trainer.publish import WeightPublisher
from swarmrl.trainer.server import SwarmServer
from swarmrl.trainer.step import screen_groups

if TYPE_CHECKING:
    from swarmrl.trainer.run import TrainingRun

log = logging.getLogger("trainer")


class Swarm:
    def __init__(
        self,
        server: SwarmServer,
        publication: Publication,
        progress: Progress,
        dashboard: Dashboard | None = None,
        cores: CoreSplit | None = None,
    ) -> None:
        self.server, self.publication, self.progress = server, publication, progress
        self.dashboard, self.cores = dashboard, cores
        assert server.contributions is not None
        self.contributions = server.contributions
        self.last_step_at = time.monotonic()

    @classmethod
    def start(
        cls,
        run: TrainingRun,
        first: dict[str, Any],
        on_ready: Callable[[str], None] | None,
        local_workers: frozenset[str] = frozenset(),
        all_threads: int = 1,
    ) -> Swarm:
        """Serve the swarm from version `run.step`, whose full weights are `first`;
        `local_workers` are the ones `swarmrl run` started on this machine, which the trainer
        may take all its `all_threads` from (cores.py)."""
        config = run.config
        history, keyframe_every = config.swarm.update_history, config.swarm.keyframe_every
        # Keyframes are encoded every history/2 versions, not every step: the deltas since the
        # newest one are always still kept, so any worker can catch up from it.
        publication = Publication(
            run.optimizer,
            codec_for(config.trainer),
            keyframe_interval=max(1, history // 2),
        )
        publisher = WeightPublisher(
            publication.published(run.step, first, after_step=False),
            history,
            keyframe_every,
            base_is_version_0=not config.model.use_peft,
        )
        publication.keyframe_due = publisher.keyframe_due
        rewards = [(r.function, load_reward_function(r.function), r.weight) for r in config.rewards]
        # The run id is new for every trainer process: workers from before a restart must not
        # trust their version numbers, so they are sent a keyframe.
        run_id = uuid.uuid4().hex[:12]
        contributions = ContributionLedger(run.folder)  # continues the chain on --resume
        server = SwarmServer(
            config, run.tokenizer, run.tasks, rewards, run.leases, publisher, run_id, contributions
        )

        server.start()
        log.info("listening on %s (run %s)", server.endpoint, server.run_id)
        (run.folder / "endpoint").write_text(server.endpoint + "\n")
        (run.folder / "trainer.pid").write_text(f"{os.getpid()}\n")  # `swarmrl status`: alive?
        address = config.logging.dashboard_address
        dashboard = None if address is None else serve_run(run.folder, address, server.worker_table)
        if on_ready is not None:
            on_ready(server.endpoint)
        trainer = config.trainer
        progress = Progress(trainer.max_steps, run.step, trainer.max_minutes)
        cores = None
        on_cpu = str(run.ranks.device) == "cpu"  # a GPU trainer leaves the cores to workers
        if config.swarm.core_split == "follow_bottleneck" and local_workers and on_cpu:
            shared = torch.get_num_threads()
            cores = CoreSplit(
                server.pause_leasing,
                torch.set_num_threads,
                local_workers,
                trainer.prompts_per_step,
                all_threads=all_threads,
                shared_threads=shared,
            )
        return cls(server, publication, progress, dashboard, cores)

    def cores_for_step(self) -> AbstractContextManager[int]:
        """Around one batch's optimizer steps: the trainer's threads for them (cores.py)."""
        if self.cores is None:
            return nullcontext(torch.get_num_threads())
        return self.cores.for_step()

    def next_batch(self, run: TrainingRun) -> list[ScoredGroup] | None:
        """A step's groups, or None after a second without them."""
        screen = None
        if run.ranks.world_size == 1:  # screening is a forward pass of the whole model
            screen = partial(
                screen_groups, run.model, config=run.config, pad_id=run.pad_id, version=run.step
            )
        batch = self.server.next_batch(timeout_s=1.0, screen=screen)
        if not self.server.alive:
            raise RuntimeError("the swarm server thread died; see the error above")
        if batch is None:
            waiting = waiting_for(*self.server.spread_counts())
            self.progress.update(run.step, None, self.server.worker_table(), waiting)
        return batch

    def after_step(
        self,
        run: TrainingRun,
        stats: dict[str, float],
        mismatches: list[LogprobMismatch],
        batch: list[ScoredGroup],
        weights: dict[str, Any],
        step_started: float,
    ) -> None:
        """Publish version `run.step`, charge mismatches, and log the step's metrics."""
        step = run.step
        self.server.report_logprob_mismatches(mismatches, batch)
        publish_started = time.monotonic()
        published = self.publication.published(step, weights)
        self.server.weights.publish(published)
        stats["publish_seconds"] = time.monotonic() - publish_started
        stats["update_bytes"] = len(
            published.keyframe if published.delta is None else published.delta.payload
        )
        groups, without_spread = self.server.spread_counts()
        scored, workers = self.server.take_rewards(), self.server.worker_table()
        write_ledger(run.folder, workers)
        self.contributions.seal(step)
        reward = sum(scored) / len(scored) if scored else float("nan")
        now = time.monotonic()
        stats.update(
            reward_mean=reward,
            samples_scored=len(scored),
            # Of the groups scored since the last step, those all right or all wrong.
            zero_spread_fraction=without_spread / groups if groups else float("nan"),
            accepted_samples_per_s=self.progress.update(step, reward, workers),
            step_seconds=now - self.last_step_at,
            train_seconds=now - step_started,  # = optimize_seconds + publish_seconds
            wait_seconds=step_started - self.last_step_at,  # for samples (and a checkpoint)
            optimize_seconds=now - step_started - stats["publish_seconds"],
            workers_connected=sum(w["connected"] for w in workers.values()),
            policy_lag=sum(step - 1 - g.policy_version for g in batch) / len(batch),
        )
        check_seconds = self.server.take_episode_check_seconds()
        if check_seconds is not None:  # re-running the environment, on the network thread
            stats["episode_check_seconds"] = check_seconds
            stats["episode_check_fraction"] = check_seconds / stats["step_seconds"]
        self.last_step_at = now
        assert run.metrics is not None
        run.metrics.write(step, stats)
        log.info(
            "step %d reward %s loss %.4f grad %.2f len %.1f lag %.1f %.1fs (train %.1fs)",
            step,
            f"{reward:.3f}" if scored else "- (none scored since the last step)",
            stats["loss"],
            stats["grad_norm"],
            stats["completion_length"],
            stats["policy_lag"],
            stats["step_seconds"],
            stats["train_seconds"],
        )
        log.debug("step %d trained on %s", step, ",".join(prompt_id(g.prompt_index) for g in batch))

    def lease_state(self) -> dict:
        return self.server.lease_state()

    def hand_over(self, timeout_s: float) -> None:
        """After the last step: lease no more, and wait up to `timeout_s` until every connected
        worker holds the final weights (a worker asks, and gets them, at its next request)."""
        self.server.finish()
        deadline = time.monotonic() + timeout_s
        while (behind := self.server.behind()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if behind:
            log.warning(
                "%d workers did not get the final weights within %.0fs: %s",
                len(behind),
                timeout_s,
                ", ".join(sorted(behind)[:8]),
            )
        else:
            log.info(
                "every connected worker holds the final weights (version %d)", self.server.version
            )

    def stop(self, run: TrainingRun) -> dict[str, Any]:
        """Close the progress display and the server; write and return the final ledger."""
        self.progress.close()
        self.server.stop()
        self.contributions.seal(run.step)
        self.contributions.close()
        workers = self.server.worker_table()
        write_ledger(run.folder, workers, finished=True)
        if self.dashboard is not None:
            self.dashboard.workers = None  # from now on: the run folder's (finished) ledger
        return workers


class NoSwarm:
    """What ranks other than 0 hold in the swarm's place: the same calls, doing nothing."""

    def cores_for_step(self) -> AbstractContextManager[int]:
        return nullcontext(torch.get_num_threads())

    def next_batch(self, run: TrainingRun) -> None:
        return None

    def after_step(self, run: TrainingRun, *step: Any) -> None:
        """Rank 0 publishes and logs."""

    def lease_state(self) -> None:
        return None

    def hand_over(self, timeout_s: float) -> None:
        """Rank 0 hands the final weights over."""

    def stop(self, run: TrainingRun) -> dict[str, Any]:
        return {}
