"""The GRPO training run, top to bottom: load, evaluate, serve the swarm, train, save, evaluate.

The trainer never generates during training. Workers pull leases from the server thread and
return completions; this loop waits until `prompts_per_step` groups with a reward spread are
buffered, takes one optimizer step on them, publishes the new weights (version = step), logs,
and checkpoints. A slow worker only means fewer samples from it; nobody waits for it.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarmrl.config import Config, to_toml
from swarmrl.logs import MetricsWriter

log = logging.getLogger("trainer")


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def train(
    config: Config,
    run_folder: Path,
    resume: bool = False,
    on_ready: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run training; `on_ready(endpoint)` is called once workers can connect. Returns a summary."""
    import torch

    from swarmrl.models import load_model, load_tokenizer
    from swarmrl.protocol.codecs import encode_full, fingerprint
    from swarmrl.rewards import load_reward_function
    from swarmrl.trainer.checkpoint import load_latest, save_checkpoint
    from swarmrl.trainer.data import load_tasks
    from swarmrl.trainer.evaluate import evaluate
    from swarmrl.trainer.leases import LeaseBook
    from swarmrl.trainer.progress import Progress
    from swarmrl.trainer.server import SwarmServer, Weights
    from swarmrl.trainer.step import train_step

    trainer = config.trainer
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    torch.manual_seed(trainer.seed)
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
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=trainer.learning_rate,
        weight_decay=trainer.weight_decay,
        betas=(trainer.adam_beta1, trainer.adam_beta2),
    )
    tasks = load_tasks(config.data, config.eval.heldout_size)
    reward_functions = [
        (r.function, load_reward_function(r.function), r.weight) for r in config.rewards
    ]
    leases = LeaseBook(config.data.seed, config.swarm.lease_timeout_s)
    checkpoint_folder = run_folder / "checkpoints"
    step, history, run_id = 0, {}, uuid.uuid4().hex[:12]
    if resume:
        state = load_latest(checkpoint_folder, model, optimizer)
        if state is None:
            log.warning("--resume: no readable checkpoint in %s; starting fresh", checkpoint_folder)
        else:
            step, history, run_id = state["step"], state["history"], state["run_id"]
            leases.restore(state["leases"])

    # ---- the starting point, measured before any worker competes for the machine --------
    metrics = MetricsWriter(run_folder, config.logging.tensorboard)
    if config.eval.before and "before" not in history:
        history["before"] = _evaluate(evaluate, model, tokenizer, tasks, config, metrics, step)

    # ---- the swarm comes up ----------------------------------------------------------------
    payload = encode_full(model)
    server = SwarmServer(
        config,
        tokenizer,
        tasks,
        reward_functions,
        leases,
        Weights(version=step, payload=payload, fingerprint=fingerprint(payload)),
        run_id,
    )
    server.start()
    log.info("listening on %s (run %s)", server.endpoint, server.run_id)
    (run_folder / "endpoint").write_text(server.endpoint + "\n")
    if on_ready is not None:
        on_ready(server.endpoint)

    # ---- train ----------------------------------------------------------------------------
    progress = Progress(trainer.max_steps, step)
    started = time.monotonic()
    budget = math.inf if trainer.max_minutes is None else trainer.max_minutes * 60
    last_step_at = started
    interrupted = False
    try:
        while step < trainer.max_steps and time.monotonic() - started < budget:
            batch = server.next_batch(timeout_s=1.0)
            if batch is None:
                progress.update(step, None, server.worker_table())
                continue
            stats = train_step(model, optimizer, batch, config, tokenizer.pad_token_id, reference)
            step += 1
            payload = encode_full(model)
            server.publish_weights(Weights(step, payload, fingerprint(payload)))
            rewards, workers = server.take_rewards(), server.worker_table()
            reward = sum(rewards) / len(rewards) if rewards else None
            rate = progress.update(step, reward, workers)
            now = time.monotonic()
            stats.update(
                reward_mean=reward if reward is not None else float("nan"),
                samples_scored=len(rewards),
                accepted_samples_per_s=rate,
                step_seconds=now - last_step_at,
                workers_connected=sum(w["connected"] for w in workers.values()),
                policy_lag=sum(step - 1 - g.policy_version for g in batch) / len(batch),
            )
            last_step_at = now
            metrics.write(step, stats)
            log.info(
                "step %d  reward %.3f  loss %.4f  grad %.3f  len %.1f  lag %.2f  %.1fs",
                step,
                stats["reward_mean"],
                stats["loss"],
                stats["grad_norm"],
                stats["completion_length"],
                stats["policy_lag"],
                stats["step_seconds"],
            )
            every = config.checkpoint.every_steps
            if every and step % every == 0:
                _checkpoint(
                    save_checkpoint,
                    checkpoint_folder,
                    step,
                    model,
                    tokenizer,
                    optimizer,
                    server,
                    history,
                    config,
                )
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted at step %d; saving a checkpoint and stopping", step)
    finally:
        progress.close()
        workers = server.worker_table()
        server.stop()
    final = _checkpoint(
        save_checkpoint,
        checkpoint_folder,
        step,
        model,
        tokenizer,
        optimizer,
        server,
        history,
        config,
    )
    if config.eval.after and not interrupted:
        history["after"] = _evaluate(evaluate, model, tokenizer, tasks, config, metrics, step)
    metrics.close()
    return {
        "steps": step,
        "checkpoint": str(final),
        "workers": workers,
        "interrupted": interrupted,
        **history,
    }


def _evaluate(
    evaluate: Any,
    model: Any,
    tokenizer: Any,
    tasks: Any,
    config: Config,
    metrics: MetricsWriter,
    step: int,
) -> float:
    started = time.monotonic()
    result = evaluate(model, tokenizer, tasks.heldout, config)
    metrics.write(
        step,
        {
            "accuracy": result.accuracy,
            "count": result.count,
            "completion_length": result.mean_completion_tokens,
        },
        kind="eval",
    )
    log.info(
        "held-out greedy accuracy at step %d: %.3f on %d prompts (%.0fs)",
        step,
        result.accuracy,
        result.count,
        time.monotonic() - started,
    )
    for question, answer, completion in result.examples:
        log.info("  %s  gold %s  model %r", question, answer, completion[:80])
    return result.accuracy


def _checkpoint(
    save: Any,
    folder: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    server: Any,
    history: dict,
    config: Config,
) -> Path:
    state = {"leases": server.lease_state(), "history": history, "run_id": server.run_id}
    path = save(folder, step, model, tokenizer, optimizer, state, config.checkpoint.keep)
    log.info("checkpoint saved: %s", path)
    return path
