"""Where the training loop runs: in this one process, or sharded over the ranks of a torchrun job.

`SingleProcess` is the plain trainer. `ShardedRanks` is chosen when torchrun started this
process with more than one rank (`torchrun --nproc-per-node N -m swarmrl train RECIPE`, the
same recipe): the model is sharded with FSDP2 (distributed.py) and the ranks stay in lockstep.
Rank 0 runs the swarm server, logs, metrics and checkpoints; every collective (the batch
broadcast, the step, gathering full weights and optimizer state, evaluation) is called by every
rank in the same order, because loop.py calls the same methods in the same order either way.

Checkpoints are the same files either way: rank 0 writes the gathered full weights and the
optimizer state keyed by parameter name, which a single-process trainer also loads (torch
matches optimizer state by position); a sharded resume reads a single-process checkpoint too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarmrl.base.config import Config, ConfigError
from swarmrl.trainer import distributed
from swarmrl.trainer.buffer import ScoredGroup
from swarmrl.trainer.checkpoint import load_latest
from swarmrl.trainer.logprob_check import LogprobMismatch
from swarmrl.trainer.step import train_step

if TYPE_CHECKING:
    from swarmrl.trainer.run import TrainingRun

StepResult = tuple[dict[str, float], list[LogprobMismatch]]


def started_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_ranks(config: Config) -> SingleProcess | ShardedRanks:
    if not started_by_torchrun():
        from swarmrl.base.models import pick_device

        return SingleProcess(pick_device(config.model.device))
    if config.model.use_peft:
        raise ConfigError(
            "model.use_peft: LoRA runs in one process only for now (the frozen base as the "
            "reference and the adapters' publication are not sharded); drop torchrun"
        )
    if config.trainer.optimizer == "demo":
        raise ConfigError(
            "trainer.optimizer: 'demo' runs in one process only (its DCT blocks need whole "
            "tensors, FSDP holds shards); set --trainer.optimizer adamw for a torchrun job"
        )
    return ShardedRanks(distributed.init_distributed())


class SingleProcess:
    """The whole model in this process: every method is the plain, local operation."""

    is_main = True
    rank = 0
    world_size = 1

    def __init__(self, device: str) -> None:
        self.device = device

    def prepare(self, model: Any, reference: Any | None) -> None:
        """Nothing to shard."""

    def step(
        self, run: TrainingRun, batch: list[ScoredGroup], old: dict[int, list[float]] | None
    ) -> StepResult:
        """One optimizer step on `batch` with the weights of version `run.step`; `old`: the
        batch's first-iteration log-probs (num_iterations > 1), filled on its first step."""
        return train_step(
            run.model,
            run.optimizer,
            batch,
            run.config,
            run.pad_id,
            run.reference,
            version=run.step,
            old_store=old,
        )

    def share_batch(
        self, batch: list[ScoredGroup] | None, stop: bool
    ) -> tuple[list[ScoredGroup] | None, bool]:
        return batch, stop

    def full_weights(self, model: Any) -> dict[str, Any]:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def full_optimizer_state(self, model: Any, optimizer: Any) -> dict[str, Any]:
        return optimizer.state_dict()

    def resume(self, folder: Path, model: Any, optimizer: Any) -> dict | None:
        return load_latest(folder, model, optimizer)

    def agree(self, value: bool) -> bool:
        return value

    def close(self) -> None:
        """Nothing to tear down."""


class ShardedRanks:
    """One rank of a torchrun job; see the module docstring for who does what."""

    def __init__(self, place: distributed.Rank) -> None:
        self.place = place
        self.is_main = place.is_main
        self.rank = place.rank
        self.world_size = place.world_size
        self.device = place.device

    def prepare(self, model: Any, reference: Any | None) -> None:
        distributed.shard_model(model)
        if reference is not None:
            distributed.shard_model(reference)

    def step(
        self, run: TrainingRun, batch: list[ScoredGroup], old: dict[int, list[float]] | None
    ) -> StepResult:
        return distributed.train_step_sharded(
            run.model,
            run.optimizer,
            batch,
            run.config,
            run.pad_id,
            self.place,
            run.reference,
            version=run.step,
            old_store=old,
        )

    def share_batch(
        self, batch: list[ScoredGroup] | None, stop: bool
    ) -> tuple[list[ScoredGroup] | None, bool]:
        return distributed.broadcast_batch(batch, self.place, stop)

    def full_weights(self, model: Any) -> dict[str, Any]:
        """Full weights on rank 0 (CPU), an empty dict elsewhere. Collective."""
        return distributed.full_parameters(model)

    def full_optimizer_state(self, model: Any, optimizer: Any) -> dict[str, Any]:
        """Rank 0: the full state keyed by parameter name; elsewhere empty. Collective."""
        return distributed.full_optimizer_state(model, optimizer)

    def resume(self, folder: Path, model: Any, optimizer: Any) -> dict | None:
        """Rank 0 reads and checks the newest readable checkpoint (as a single process would);
        every rank then loads its shard of it. Collective; the state on every rank."""
        found: dict[str, Any] = {}

        def keep(tensors: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
            found["tensors"], found["optimizer"] = tensors, optimizer_state

        state = load_latest(folder, model, optimizer, restore=keep) if self.is_main else None
        state = from_rank0(state)  # small: step, lease state, history
        if state is None:
            return None
        names = [name for name, _ in model.named_parameters()]
        optimizer_state = by_name(found["optimizer"], names) if self.is_main else {}
        distributed.load_full_state(model, optimizer, found.get("tensors", {}), optimizer_state)
        return state

    def agree(self, value: bool) -> bool:
        """Rank 0's `value` on every rank: decisions that keep the ranks' collectives in step."""
        return bool(from_rank0(value))

    def close(self) -> None:
        distributed.shutdown()


Ranks = SingleProcess | ShardedRanks


def from_rank0(value: Any) -> Any:
    """Rank 0's `value` (small, plain data) on every rank. Collective."""
    import torch.distributed as dist

    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def by_name(optimizer_state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name. A single process's `state_dict()`
    numbers the parameters in `model.parameters()` order; a sharded run's is already by name."""
    order: list[Any] = [p for group in optimizer_state["param_groups"] for p in group["params"]]
    if all(isinstance(key, str) for key in order):
        return optimizer_state
    rename = dict(zip(order, names, strict=True))
    return {
        "state": {rename[key]: value for key, value in optimizer_state["state"].items()},
        "param_groups": [
            {**group, "params": [rename[key] for key in group["params"]]}
            for group in optimizer_state["param_groups"]
        ],
    }
