"""The GRPO training run, top to bottom: load, evaluate, serve the swarm, train, save, evaluate.

The trainer never generates during training. Workers pull leases from the server thread and
return completions; this loop waits until `prompts_per_step` groups with a reward spread are
buffered, takes one optimizer step on them, publishes the new weights (version = step: a delta
in the recipe's codec plus a keyframe for workers that cannot replay it), logs,
and checkpoints. A slow worker only means fewer samples from it; nobody waits for it.
The first Ctrl-C finishes the current step, saves a checkpoint and stops; a second one aborts.
(This module imports torch: the CLI imports it only when a run starts.)
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from swarmrl.config import Config, to_toml
from swarmrl.logs import MetricsWriter
from swarmrl.models import load_model, load_tokenizer
from swarmrl.rewards import load_reward_function
from swarmrl.trainer.buffer import ScoredGroup
from swarmrl.trainer.checkpoint import CheckpointError, checkpoints, save_checkpoint
from swarmrl.trainer.data import load_tasks
from swarmrl.trainer.evaluate import evaluate
from swarmrl.trainer.leases import LeaseBook, prompt_id
from swarmrl.trainer.ledger import write_ledger
from swarmrl.trainer.optimizers import Publication, make_optimizer
from swarmrl.trainer.progress import Progress
from swarmrl.trainer.publish import WeightPublisher
from swarmrl.trainer.ranks import Ranks, make_ranks
from swarmrl.trainer.server import SwarmServer
from swarmrl.trainer.step import screen_groups
from swarmrl.trainer.verify import LogprobMismatch

log = logging.getLogger("trainer")


def train(
    config: Config,
    run_folder: Path,
    resume: bool = False,
    on_ready: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run training; `on_ready(endpoint)` is called once workers can connect. Returns a summary.

    Under torchrun every rank runs this function (see ranks.py); only rank 0 serves the
    swarm, writes the run folder and calls `on_ready`."""
    trainer = config.trainer
    ranks = make_ranks(config)
    all_threads = torch.get_num_threads()  # for evaluation, when no worker is generating
    torch.manual_seed(trainer.seed)

    # ---- model, optimizer, data --------------------------------------------------------------
    where = f"rank {ranks.rank} of {ranks.world_size}, " if ranks.world_size > 1 else ""
    log.info("loading %s on %s%s", config.model.name, where, ranks.device)
    tokenizer = load_tokenizer(config.model.name)
    model = load_model(config.model.name, dtype=config.model.dtype, device=ranks.device)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    reference = None
    if trainer.beta > 0:
        reference = load_model(config.model.name, dtype=config.model.dtype, device=ranks.device)
        reference.requires_grad_(False)
    ranks.prepare(model, reference)
    optimizer = make_optimizer(model, trainer)
    tasks = load_tasks(config.data, config.eval.heldout_size)
    leases = LeaseBook(config.data.seed, config.swarm.lease_timeout_s)
    ckpt_dir = run_folder / "checkpoints"
    step, history, saved_step = 0, {}, None
    if resume:
        state = ranks.resume(ckpt_dir, model, optimizer)
        if state is None:
            log.warning("--resume: no readable checkpoint in %s; starting fresh", ckpt_dir)
        else:
            step, history, saved_step = state["step"], state["history"], state["step"]
            leases.restore(state["leases"])

    # ---- the starting point, measured before any worker competes for the machine ---------
    metrics = None
    if ranks.is_main:
        run_folder.mkdir(parents=True, exist_ok=True)
        (run_folder / "config.toml").write_text(to_toml(config))
        metrics = MetricsWriter(run_folder, config.logging.tensorboard)
    if config.eval.before and "before" not in history:
        history["before"] = run_eval(model, tokenizer, tasks, config, metrics, step, ranks)

    # ---- the swarm comes up (on rank 0) --------------------------------------------------
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    first = ranks.full_weights(model)
    swarm = None
    if metrics is not None:
        swarm = Swarm.start(config, tokenizer, tasks, leases, optimizer, first, step, metrics,
                            run_folder)  # fmt: skip
        if on_ready is not None:
            on_ready(swarm.server.endpoint)
    del first

    # ---- train -----------------------------------------------------------------------------
    stop = StopRequest()
    started = time.monotonic()
    budget = math.inf if trainer.max_minutes is None else trainer.max_minutes * 60
    try:
        while True:
            batch = None
            done = step >= trainer.max_steps or time.monotonic() - started >= budget or bool(stop)
            if swarm is not None and not done:
                batch = swarm.next_batch(step)
                if batch is not None and ranks.world_size == 1:  # a rank-0-only forward: 1 rank
                    check = partial(screen_groups, model, config=config,
                                    pad_id=tokenizer.pad_token_id, version=step)  # fmt: skip
                    batch = swarm.screen(batch, check)
            batch, done = ranks.share_batch(batch, done)  # rank 0 decides for every rank
            if done:
                break
            if batch is None:
                continue
            step_started = time.monotonic()
            stats, mismatches = ranks.step(
                model, optimizer, batch, config, tokenizer.pad_token_id, reference, step
            )
            step += 1
            full = ranks.full_weights(model)
            if swarm is not None:
                swarm.after_step(step, stats, mismatches, batch, full, step_started)
            every = config.checkpoint.every_steps
            if every and step % every == 0:
                saved = save(ckpt_dir, step, model, tokenizer, optimizer, swarm, history, config,
                             ranks, full)  # fmt: skip
                saved_step = step if saved else saved_step
    finally:
        stop.restore()
        workers = swarm.stop() if swarm is not None else {}
    interrupted = ranks.agree(bool(stop))
    if interrupted:
        log.warning("stopped by Ctrl-C at step %d", step)
    if step != saved_step:  # else nothing was trained since: that checkpoint is the final one
        save(ckpt_dir, step, model, tokenizer, optimizer, swarm, history, config, ranks)
    kept = checkpoints(ckpt_dir) if ranks.is_main else []
    final = kept[-1] if kept else None
    if config.eval.after and not interrupted:
        torch.set_num_threads(all_threads)  # the workers have nothing to do any more
        history["after"] = run_eval(model, tokenizer, tasks, config, metrics, step, ranks)
    if metrics is not None:
        metrics.close()
    ranks.close()
    return {
        "steps": step,
        "checkpoint": None if final is None else str(final),
        "workers": workers,
        "interrupted": interrupted,
        **history,
    }


class Swarm:
    """Rank 0's side of the run: the swarm server, publishing each version, progress, metrics."""

    def __init__(self, server: SwarmServer, weights: WeightPublisher, publication: Publication,
                 metrics: MetricsWriter, progress: Progress, run_folder: Path) -> None:  # fmt: skip
        self.server, self.weights, self.publication = server, weights, publication
        self.metrics, self.progress, self.run_folder = metrics, progress, run_folder
        self.last_step_at = time.monotonic()
        self.proven: set[str] = set()  # workers whose groups passed the log-prob check

    @classmethod
    def start(
        cls, config: Config, tokenizer: Any, tasks: Any, leases: LeaseBook, optimizer: Any,
        weights: dict[str, Any], step: int, metrics: MetricsWriter, run_folder: Path,
    ) -> Swarm:  # fmt: skip
        publication = Publication(optimizer, config.trainer.codec)
        publisher = WeightPublisher(
            publication.published(step, weights, after_step=False),
            config.swarm.update_history,
            config.swarm.keyframe_every,
        )
        rewards = [(r.function, load_reward_function(r.function), r.weight) for r in config.rewards]
        # The run id is new for every trainer process: workers from before a restart must not
        # trust their version numbers, so they are sent a keyframe.
        run_id = uuid.uuid4().hex[:12]
        server = SwarmServer(config, tokenizer, tasks, rewards, leases, publisher, run_id)
        server.start()
        log.info("listening on %s (run %s)", server.endpoint, server.run_id)
        (run_folder / "endpoint").write_text(server.endpoint + "\n")
        progress = Progress(config.trainer.max_steps, step)
        return cls(server, publisher, publication, metrics, progress, run_folder)

    def next_batch(self, step: int) -> list[ScoredGroup] | None:
        batch = self.server.next_batch(timeout_s=1.0)
        if not self.server.alive:
            raise RuntimeError("the swarm server thread died; see the error above")
        if batch is None:
            self.progress.update(step, None, self.server.worker_table())
        return batch

    def screen(
        self, batch: list[ScoredGroup], check: Callable[[list[ScoredGroup]], list[LogprobMismatch]]
    ) -> list[ScoredGroup] | None:
        """The batch if every group from a worker not yet proven honest passes the log-prob
        check; else None, with the failing groups refused (their prompts leased again, their
        workers charged) and the rest back in the buffer. A worker whose groups all passed is
        proven: later groups go straight to the step (which checks them again anyway). So a
        stream of new forgers costs the trainer a forward pass each, not a step's slots."""
        newcomers = [g for g in batch if g.worker_id not in self.proven]
        if not newcomers:
            return batch
        failed = check(newcomers)
        self.proven |= {g.worker_id for g in newcomers} - {f.worker_id for f in failed}
        if not failed:
            return batch
        bad = {(f.worker_id, f.prompt_index) for f in failed}
        refused = [g for g in batch if (g.worker_id, g.prompt_index) in bad]
        log.info("screened %d groups from new workers: %d failed the log-prob check; refused",
                 len(newcomers), len(refused))  # fmt: skip
        kept = [g for g in batch if (g.worker_id, g.prompt_index) not in bad]
        self.server.put_back(kept, refused)
        self.server.report_logprob_mismatches(failed)  # may quarantine: after the put-back
        return None

    def after_step(
        self, step: int, stats: dict[str, float], mismatches: list[LogprobMismatch],
        batch: list[ScoredGroup], weights: dict[str, Any], step_started: float,
    ) -> None:  # fmt: skip
        """Publish version `step`, charge mismatches, and log the step's metrics."""
        self.server.report_logprob_mismatches(mismatches)
        publish_started = time.monotonic()
        published = self.publication.published(step, weights)
        self.weights.publish(published)
        stats["publish_seconds"] = time.monotonic() - publish_started
        stats["update_bytes"] = len(
            published.keyframe if published.delta is None else published.delta.payload
        )
        scored, workers = self.server.take_rewards(), self.server.worker_table()
        write_ledger(self.run_folder, workers)
        reward = sum(scored) / len(scored) if scored else float("nan")
        now = time.monotonic()
        stats.update(
            reward_mean=reward,
            samples_scored=len(scored),
            accepted_samples_per_s=self.progress.update(step, reward, workers),
            step_seconds=now - self.last_step_at,
            train_seconds=now - step_started,
            workers_connected=sum(w["connected"] for w in workers.values()),
            policy_lag=sum(step - 1 - g.policy_version for g in batch) / len(batch),
        )
        self.last_step_at = now
        self.metrics.write(step, stats)
        log.info(
            "step %d reward %.3f loss %.4f grad %.2f len %.1f lag %.1f %.1fs (train %.1fs)",
            step, reward, stats["loss"], stats["grad_norm"], stats["completion_length"],
            stats["policy_lag"], stats["step_seconds"], stats["train_seconds"],
        )  # fmt: skip
        log.debug("step %d trained on %s", step, ",".join(prompt_id(g.prompt_index) for g in batch))

    def stop(self) -> dict[str, Any]:
        """Close the progress display and the server; the final worker table."""
        self.progress.close()
        workers = self.server.worker_table()
        self.server.stop()
        return workers


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


def run_eval(
    model: Any, tokenizer: Any, tasks: Any, config: Config, metrics: MetricsWriter | None,
    step: int, ranks: Ranks,
) -> float:  # fmt: skip
    """Held-out greedy accuracy (every rank of a sharded model runs it; rank 0 reports it)."""
    started = time.monotonic()
    result = evaluate(model, tokenizer, tasks.heldout, config, synced_gpus=ranks.world_size > 1)
    if metrics is None:
        return result.accuracy
    values = {
        "accuracy": result.accuracy,
        "count": result.count,
        "completion_length": result.mean_completion_tokens,
    }
    metrics.write(step, values, kind="eval")
    log.info(
        "held-out greedy accuracy at step %d: %.3f on %d prompts (%.0fs)",
        step, result.accuracy, result.count, time.monotonic() - started,
    )  # fmt: skip
    for question, answer, completion in result.examples:
        log.info("  %s  gold %s  model %r", question, answer, completion[:80])
    return result.accuracy


def save(
    folder: Path, step: int, model: Any, tokenizer: Any, optimizer: Any,
    swarm: Swarm | None, history: dict, config: Config, ranks: Ranks,
    weights: dict[str, Any] | None = None,
) -> bool:  # fmt: skip
    """Checkpoint this step (collective when sharded: every rank calls it, rank 0 writes).

    `weights`: this step's full weights if already gathered. A failed write (a full disk) is
    logged and training goes on: the save left every earlier checkpoint as it was, and the
    next one may succeed."""
    if weights is None:
        weights = ranks.full_weights(model)
    optimizer_state = ranks.full_optimizer_state(model, optimizer)
    if swarm is None:
        return ranks.agree(False)  # rank 0's outcome
    state = {"leases": swarm.server.lease_state(), "history": history}
    try:
        path = save_checkpoint(
            folder, step, model, tokenizer, optimizer_state, state, config.checkpoint.keep,
            weights if ranks.world_size > 1 else None,
        )  # fmt: skip
    except CheckpointError as error:
        kept = checkpoints(folder)
        log.error(
            "%s; the newest checkpoint is still %s", error, kept[-1] if kept else "(none yet)"
        )
        return ranks.agree(False)
    log.info("checkpoint saved: %s", path)
    return ranks.agree(True)
