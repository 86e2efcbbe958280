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
from pathlib import Path
from typing import Any

import torch

from swarmrl.config import Config, to_toml
from swarmrl.logs import MetricsWriter
from swarmrl.models import load_model, load_tokenizer, pick_device
from swarmrl.rewards import load_reward_function
from swarmrl.trainer.checkpoint import CheckpointError, checkpoints, load_latest, save_checkpoint
from swarmrl.trainer.data import load_tasks
from swarmrl.trainer.evaluate import evaluate
from swarmrl.trainer.leases import LeaseBook, prompt_id
from swarmrl.trainer.ledger import write_ledger
from swarmrl.trainer.optimizers import Publication, make_optimizer
from swarmrl.trainer.progress import Progress
from swarmrl.trainer.publish import WeightPublisher
from swarmrl.trainer.server import SwarmServer
from swarmrl.trainer.step import train_step

log = logging.getLogger("trainer")


def train(
    config: Config,
    run_folder: Path,
    resume: bool = False,
    on_ready: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run training; `on_ready(endpoint)` is called once workers can connect. Returns a summary."""
    trainer = config.trainer
    all_threads = torch.get_num_threads()  # for evaluation, when no worker is generating
    torch.manual_seed(trainer.seed)
    run_folder.mkdir(parents=True, exist_ok=True)
    (run_folder / "config.toml").write_text(to_toml(config))
    device = pick_device(config.model.device)

    # ---- model, optimizer, data, rewards -------------------------------------------------
    log.info("loading %s on %s", config.model.name, device)
    tokenizer = load_tokenizer(config.model.name)
    model = load_model(config.model.name, dtype=config.model.dtype, device=device)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    reference = None
    if trainer.beta > 0:
        reference = load_model(config.model.name, dtype=config.model.dtype, device=device)
        reference.requires_grad_(False)
    optimizer = make_optimizer(model, trainer)
    tasks = load_tasks(config.data, config.eval.heldout_size)
    rewards = [(r.function, load_reward_function(r.function), r.weight) for r in config.rewards]
    leases = LeaseBook(config.data.seed, config.swarm.lease_timeout_s)
    ckpt_dir = run_folder / "checkpoints"
    step, history, saved_step = 0, {}, None
    if resume:
        state = load_latest(ckpt_dir, model, optimizer)
        if state is None:
            log.warning("--resume: no readable checkpoint in %s; starting fresh", ckpt_dir)
        else:
            step, history, saved_step = state["step"], state["history"], state["step"]
            leases.restore(state["leases"])

    # ---- the starting point, measured before any worker competes for the machine ---------
    metrics = MetricsWriter(run_folder, config.logging.tensorboard)
    if config.eval.before and "before" not in history:
        history["before"] = run_eval(model, tokenizer, tasks, config, metrics, step)

    # ---- the swarm comes up ----------------------------------------------------------------
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    # The run id is new for every trainer process: workers from before a restart must not
    # trust their version numbers, so they are sent a keyframe.
    run_id = uuid.uuid4().hex[:12]
    publication = Publication(model, optimizer, trainer.codec)
    weights = WeightPublisher(
        publication.published(step, after_step=False),
        config.swarm.update_history,
        config.swarm.keyframe_every,
    )
    server = SwarmServer(config, tokenizer, tasks, rewards, leases, weights, run_id)
    server.start()
    log.info("listening on %s (run %s)", server.endpoint, server.run_id)
    (run_folder / "endpoint").write_text(server.endpoint + "\n")
    if on_ready is not None:
        on_ready(server.endpoint)

    # ---- train -----------------------------------------------------------------------------
    stop = StopRequest()
    progress = Progress(trainer.max_steps, step)
    started = last_step_at = time.monotonic()
    budget = math.inf if trainer.max_minutes is None else trainer.max_minutes * 60
    try:
        while step < trainer.max_steps and time.monotonic() - started < budget and not stop:
            batch = server.next_batch(timeout_s=1.0)
            if not server.alive:
                raise RuntimeError("the swarm server thread died; see the error above")
            if batch is None:
                progress.update(step, None, server.worker_table())
                continue
            step_started = time.monotonic()
            stats, mismatches = train_step(
                model, optimizer, batch, config, tokenizer.pad_token_id, reference, version=step
            )
            server.report_logprob_mismatches(mismatches)
            step += 1
            publish_started = time.monotonic()
            published = publication.published(step)
            weights.publish(published)
            stats["publish_seconds"] = time.monotonic() - publish_started
            stats["update_bytes"] = len(
                published.keyframe if published.delta is None else published.delta.payload
            )
            scored, workers = server.take_rewards(), server.worker_table()
            write_ledger(run_folder, workers)
            reward = sum(scored) / len(scored) if scored else float("nan")
            now = time.monotonic()
            stats.update(
                reward_mean=reward,
                samples_scored=len(scored),
                accepted_samples_per_s=progress.update(step, reward, workers),
                step_seconds=now - last_step_at,
                train_seconds=now - step_started,
                workers_connected=sum(w["connected"] for w in workers.values()),
                policy_lag=sum(step - 1 - g.policy_version for g in batch) / len(batch),
            )
            last_step_at = now
            metrics.write(step, stats)
            log.info(
                "step %d reward %.3f loss %.4f grad %.2f len %.1f lag %.1f %.1fs (train %.1fs)",
                step, reward, stats["loss"], stats["grad_norm"], stats["completion_length"],
                stats["policy_lag"], stats["step_seconds"], stats["train_seconds"],
            )  # fmt: skip
            log.debug(
                "step %d trained on %s", step, ",".join(prompt_id(g.prompt_index) for g in batch)
            )
            every = config.checkpoint.every_steps
            if every and step % every == 0:
                saved = save(ckpt_dir, step, model, tokenizer, optimizer, server, history, config)
                saved_step = step if saved else saved_step
    finally:
        stop.restore()
        progress.close()
        workers = server.worker_table()
        server.stop()
    if stop:
        log.warning("stopped by Ctrl-C at step %d", step)
    if step != saved_step:  # else nothing was trained since: that checkpoint is the final one
        save(ckpt_dir, step, model, tokenizer, optimizer, server, history, config)
    final = checkpoints(ckpt_dir)[-1] if checkpoints(ckpt_dir) else None
    if config.eval.after and not stop:
        torch.set_num_threads(all_threads)  # the workers have nothing to do any more
        history["after"] = run_eval(model, tokenizer, tasks, config, metrics, step)
    metrics.close()
    return {
        "steps": step,
        "checkpoint": None if final is None else str(final),
        "workers": workers,
        "interrupted": bool(stop),
        **history,
    }


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
    model: Any, tokenizer: Any, tasks: Any, config: Config, metrics: MetricsWriter, step: int
) -> float:
    started = time.monotonic()
    result = evaluate(model, tokenizer, tasks.heldout, config)
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
    folder: Path, step: int, model: Any, tokenizer: Any, optimizer: Any, server: SwarmServer,
    history: dict, config: Config,
) -> bool:  # fmt: skip
    """Checkpoint this step. A failed write (a full disk) is logged and training goes on: the
    save left every earlier checkpoint as it was, and the next one may succeed."""
    state = {"leases": server.lease_state(), "history": history}
    try:
        path = save_checkpoint(
            folder, step, model, tokenizer, optimizer, state, config.checkpoint.keep
        )
    except CheckpointError as error:
        kept = checkpoints(folder)
        log.error(
            "%s; the newest checkpoint is still %s", error, kept[-1] if kept else "(none yet)"
        )
        return False
    log.info("checkpoint saved: %s", path)
    return True
