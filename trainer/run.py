"""One training run's state, from loading the model to the last checkpoint: `TrainingRun`.

It holds what the loop passes around: the config and run folder, the ranks (one process or a
torchrun job), the tokenizer, the policy (and the frozen reference when `beta > 0`), the
optimizer, the tasks, the lease book, the step and the held-out results. It loads them (and a
checkpoint on `--resume`), evaluates held-out accuracy, and checkpoints. Every method is
called on every rank in the same order; rank 0 alone writes the run folder and the metrics.
(This module imports torch: the CLI imports it only when a run starts.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarmrl.base.adapters import AdaptersOff, add_adapters
from swarmrl.base.config import Config
from swarmrl.base.logs import MetricsWriter
from swarmrl.base.models import load_model, load_tokenizer
from swarmrl.base.recipes import to_toml
from swarmrl.trainer.checkpoint import CheckpointError, checkpoints, save_checkpoint
from swarmrl.trainer.data import load_tasks
from swarmrl.trainer.evaluate import evaluate
from swarmrl.trainer.leases import LeaseBook
from swarmrl.trainer.memory import return_freed_tensors
from swarmrl.trainer.optimizers import make_optimizer

if TYPE_CHECKING:
    from swarmrl.trainer.ranks import Ranks

log = logging.getLogger("trainer")


@dataclass
class TrainingRun:
    config: Config
    folder: Path
    ranks: Ranks
    tokenizer: Any
    model: Any
    reference: Any | None  # the frozen starting policy, for the KL term (beta > 0)
    optimizer: Any
    tasks: Any
    leases: LeaseBook
    step: int = 0
    history: dict[str, float] = field(default_factory=dict)  # accuracy "before" and "after"
    saved_step: int | None = None  # the newest checkpoint's step
    metrics: MetricsWriter | None = None  # rank 0's metrics.jsonl and TensorBoard

    @classmethod
    def load(cls, config: Config, folder: Path, ranks: Ranks, resume: bool) -> TrainingRun:
        """The model (sharded if the ranks say so), optimizer, data and lease book; with
        `resume`, the newest readable checkpoint in `folder`."""
        return_freed_tensors()  # before the first tensor: see memory.py
        where = f"rank {ranks.rank} of {ranks.world_size}, " if ranks.world_size > 1 else ""
        log.info("loading %s on %s%s", config.model.name, where, ranks.device)
        model = load_model(config.model.name, dtype=config.model.dtype, device=ranks.device)
        if config.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        reference = None
        if config.model.use_peft:
            model = add_adapters(model, config.model)
            reference = AdaptersOff(model) if config.trainer.beta > 0 else None
        elif config.trainer.beta > 0:
            reference = load_model(config.model.name, dtype=config.model.dtype, device=ranks.device)
            reference.requires_grad_(False)
        ranks.prepare(model, reference)
        run = cls(
            config=config,
            folder=folder,
            ranks=ranks,
            tokenizer=load_tokenizer(config.model.name),
            model=model,
            reference=reference,
            optimizer=make_optimizer(model, config.trainer),
            tasks=load_tasks(config.data, config.eval.heldout_size),
            leases=LeaseBook.from_config(config),
        )
        if resume:
            run.restore()
        if ranks.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.toml").write_text(to_toml(config))
            settings = config.model_dump(mode="json")
            run.metrics = MetricsWriter(folder, config.logging.report_to, settings)
        return run

    @property
    def checkpoint_folder(self) -> Path:
        return self.folder / "checkpoints"

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def restore(self) -> None:
        state = self.ranks.resume(self.checkpoint_folder, self.model, self.optimizer)
        if state is None:
            log.warning(
                "--resume: no readable checkpoint in %s; starting fresh", self.checkpoint_folder
            )
            return
        self.step = self.saved_step = state["step"]
        self.history = state["history"]
        self.leases.restore(state["leases"])

    def evaluate(self, when: str) -> None:
        """Held-out greedy accuracy now, kept as history[`when`] (every rank of a sharded
        model runs it; rank 0 reports it)."""
        if when in self.history:
            return  # measured before a restart
        started = time.monotonic()
        result = evaluate(
            self.model,
            self.tokenizer,
            self.tasks.heldout,
            self.config,
            synced_gpus=self.ranks.world_size > 1,
        )
        self.history[when] = result.accuracy
        if not self.ranks.is_main:
            return
        assert self.metrics is not None
        values = {
            "accuracy": result.accuracy,
            "count": result.count,
            "completion_length": result.mean_completion_tokens,
            "model_turns": result.mean_model_turns,
        }
        self.metrics.write(self.step, values, kind="eval")
        log.info(
            "held-out greedy accuracy at step %d: %.3f on %d prompts (%.0fs)",
            self.step,
            result.accuracy,
            result.count,
            time.monotonic() - started,
        )
        for question, answer, completion in result.examples:
            log.info("  %s  gold %s  model %r", question, answer, completion[:160])

    def checkpoint_due(self) -> bool:
        every = self.config.checkpoint.every_steps
        return bool(every) and self.step % every == 0

    def save(self, lease_state: dict | None, weights: dict[str, Any] | None = None) -> None:
        """Checkpoint this step (collective when sharded: every rank calls it, rank 0 writes
        with rank 0's `lease_state`). `weights`: this step's full weights if already gathered.
        A failed write (a full disk) is logged and training goes on: the save left every
        earlier checkpoint as it was, and the next one may succeed."""
        ranks = self.ranks
        if weights is None:
            weights = ranks.full_weights(self.model)
        optimizer_state = ranks.full_optimizer_state(self.model, self.optimizer)
        saved = False
        if ranks.is_main:
            state = {"leases": lease_state, "history": self.history}
            try:
                path = save_checkpoint(
                    self.checkpoint_folder,
                    self.step,
                    self.model,
                    self.tokenizer,
                    optimizer_state,
                    state,
                    self.config.checkpoint.keep,
                    weights if ranks.world_size > 1 else None,
                )
                log.info("checkpoint saved: %s", path)
                saved = True
            except CheckpointError as error:
                kept = checkpoints(self.checkpoint_folder)
                log.error(
                    "%s; the newest checkpoint is still %s",
                    error,
                    kept[-1] if kept else "(none yet)",
                )
        if ranks.agree(saved):  # rank 0's outcome
            self.saved_step = self.step

    def finish(self, workers: dict[str, Any], interrupted: bool) -> dict[str, Any]:
        """Close the metrics and the ranks; the run's summary."""
        if self.metrics is not None:
            self.metrics.close()
        self.ranks.close()
        kept = checkpoints(self.checkpoint_folder) if self.ranks.is_main else []
        return {
            "steps": self.step,
            "checkpoint": str(kept[-1]) if kept else None,
            "workers": workers,
            "interrupted": interrupted,
            **self.history,
        }
