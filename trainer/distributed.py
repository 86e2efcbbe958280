"""The sharded trainer: one GRPO step across the ranks of a `torchrun` job, with FSDP2.

This module owns what changes when the trainer runs as several processes: the process group
(gloo on CPU, NCCL on GPU, from torchrun's environment), sharding the model (`fully_shard` per
decoder layer, then the root), handing every rank the step's batch, splitting the step's
sequences over the ranks, and gathering full weights and optimizer state where one copy is
needed (publishing to workers, checkpoints).

Rank 0 owns the swarm server (leases, scoring); `broadcast_batch` sends its batch to the other
ranks as msgpack bytes (never pickle). The step itself is step.py's: every rank builds the
whole step's sequences and normaliser (so the loss is divided by the global token count with
no extra communication), runs `accumulate_gradients` on its share (which also masks the
sequences that fail the log-prob check; every rank gets the full list), FSDP sums the
gradient shards over the ranks (divide factor 1), and `apply_gradients` clips and steps as in
one process. The result equals a single-process `train_step` on the same batch up to float
rounding (tests/test_distributed.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from swarmrl.base.config import Config
from swarmrl.trainer.buffer import ScoredGroup
from swarmrl.trainer.logprob_check import LogprobMismatch
from swarmrl.trainer.schedule import learning_rate
from swarmrl.trainer.step import (
    Sequence,
    accumulate_gradients,
    apply_gradients,
    step_normaliser,
    step_sequences,
    step_summary,
)

if TYPE_CHECKING:
    import torch

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Rank:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" or "cuda:<local_rank>"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 1800.0) -> Rank:
    """Join the process group described by torchrun's environment variables.

    NCCL with one GPU per rank (`LOCAL_RANK`) when CUDA is available, gloo on the CPU
    otherwise. `timeout_s` bounds every collective, including the wait for rank 0's next batch.
    """
    import torch
    import torch.distributed as dist

    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not set: start the sharded trainer with torchrun "
            "(see docs/scale.md)"
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", f"cuda:{local_rank}"
    else:
        backend, device = "gloo", "cpu"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=torch.device(device) if backend == "nccl" else None,
        )
    return Rank(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks: the modules transformers names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class to shard")
    return layers


def shard_model(model: Any) -> Any:
    """Shard in place with FSDP2: one unit per decoder layer, the rest (embeddings, norm, tied
    head) in the root unit. Build the optimizer after this: its parameters become DTensors."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    # Each rank's loss is already divided by the whole step's counts: sum the gradients over
    # the ranks instead of averaging them (a plain SUM: gloo has no pre-scaled sum).
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def split_micro_batches(
    sequences: list[Sequence], micro_batch_size: int, rank: int, world_size: int
) -> list[list[Sequence]]:
    """This rank's micro-batches of the step's (length-sorted) sequences.

    Rank r takes every world_size-th sequence from r, so the ranks get similar token counts;
    every rank gets the same number of micro-batches (FSDP's collectives run in lockstep),
    as even as possible, some of them empty when a rank holds fewer sequences than that.
    """
    mine = sequences[rank::world_size]
    per_rank = -(-len(sequences) // world_size)
    count = max(1, -(-per_rank // micro_batch_size))
    return [mine[k * len(mine) // count : (k + 1) * len(mine) // count] for k in range(count)]


def train_step_sharded(
    model: Any,
    optimizer: Any,
    groups: list[ScoredGroup],
    config: Config,
    pad_id: int,
    rank: Rank,
    reference: Any | None = None,
    *,
    version: int,
    old_store: dict[int, list[float]] | None = None,
) -> tuple[dict[str, float], list[LogprobMismatch]]:
    """step.py's `train_step` with the batch spread over the ranks; call it on every rank with
    the same `groups` (see `broadcast_batch`). Every rank gets the whole step's stats and the
    log-prob mismatches found on all ranks. Each rank keeps its own sequences' `old_store`."""
    sequences = step_sequences(groups, config, version)
    normaliser = step_normaliser(sequences)
    size = config.trainer.micro_batch_size
    chunks = split_micro_batches(sequences, size, rank.rank, rank.world_size)
    work = [chunk for chunk in chunks if chunk]
    model.train()
    totals, mismatches = accumulate_gradients(
        model, work, normaliser, config, pad_id, reference, old_store
    )
    for _ in range(len(chunks) - len(work)):
        idle_pass(model, pad_id, reference)
    totals, mismatches = gather_over_ranks(totals, mismatches)
    totals.update(apply_gradients(model, optimizer, config, version))
    totals["learning_rate"] = learning_rate(config.trainer, version)
    model.eval()
    return {**totals, **step_summary(sequences, normaliser)}, mismatches


def idle_pass(model: Any, pad_id: int, reference: Any | None = None) -> None:
    """A forward and backward that adds zero gradient: a rank with no sequence for this
    micro-batch still takes part in FSDP's all-gathers and reduce-scatters, in the order
    `accumulate_gradients` runs them (model forward, reference forward, backward)."""
    import torch

    device = next(model.parameters()).device
    ids = torch.full((1, 1), pad_id, device=device)
    logits = model(input_ids=ids, logits_to_keep=1).logits
    if reference is not None:
        with torch.no_grad():
            reference(input_ids=ids, logits_to_keep=1)
    (logits.float().sum() * 0.0).backward()


def gather_over_ranks(
    totals: dict[str, float], mismatches: list[LogprobMismatch]
) -> tuple[dict[str, float], list[LogprobMismatch]]:
    """Add up each rank's share of the step's loss and token-weighted stats; collect every
    rank's log-prob mismatches. (Pickled by torch between this job's own ranks only.)"""
    import torch.distributed as dist

    shares: list[tuple[dict[str, float], list[LogprobMismatch]] | None] = [None] * (
        dist.get_world_size()
    )
    dist.all_gather_object(shares, (totals, mismatches))
    summed: dict[str, float] = {}
    everyone: list[LogprobMismatch] = []
    for share_totals, share_mismatches in (share for share in shares if share is not None):
        for name, value in share_totals.items():
            summed[name] = summed.get(name, 0.0) + value
        everyone += share_mismatches
    return summed, everyone


def broadcast_batch(
    batch: list[ScoredGroup] | None, rank: Rank, stop: bool = False
) -> tuple[list[ScoredGroup] | None, bool]:
    """Rank 0's (batch, stop) on every rank; the other ranks pass None.

    Rank 0 calls it after every `next_batch` (None when no batch came within the timeout), so
    the other ranks never sit in one collective for longer than that; `stop` ends the run.
    """
    import msgpack
    import torch
    import torch.distributed as dist

    size = torch.zeros(1, dtype=torch.int64, device=rank.device)
    if rank.is_main:
        groups = None if batch is None else [asdict(group) for group in batch]
        payload = msgpack.packb({"stop": stop, "groups": groups})
        size[0] = len(payload)
    dist.broadcast(size, src=0)
    if rank.is_main:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(rank.device)
    else:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=rank.device)
    dist.broadcast(data, src=0)
    if rank.is_main:
        return batch, stop
    message = msgpack.unpackb(data.cpu().numpy().tobytes())
    groups = message["groups"]
    return (None if groups is None else [ScoredGroup(**g) for g in groups]), message["stop"]


def full_parameters(model: Any) -> dict[str, torch.Tensor]:
    """Every parameter's full value, on the CPU of rank 0 (an empty dict on the other ranks).

    Collective: call it on every rank. Keys are `named_parameters()` names, tied weights once,
    as codecs.encode_full publishes them and as a transformers model loads them.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {name: state[name] for name, _ in model.named_parameters() if name in state}


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's full state on the CPU of rank 0, keyed by parameter name (empty on the
    other ranks). Collective. `load_full_state` puts it back on a sharded model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(
    model: Any, optimizer: Any, parameters: dict[str, Any], optimizer_state: dict[str, Any]
) -> None:
    """Rank 0's full parameters and optimizer state (as gathered above) into every rank's
    shards; the other ranks pass empty dicts. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # strict=False: tied weights are in `parameters` once (the embedding), not as lm_head.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    # Two calls: set_state_dict skips the model on ranks whose model dict is empty. Both fill
    # the dicts they are given with the local shards: hand them copies (tensors shared).
    set_model_state_dict(model, _containers_copied(parameters), options=options)
    set_optimizer_state_dict(model, optimizer, _containers_copied(optimizer_state), options=options)


def _containers_copied(value: Any) -> Any:
    """Nested dicts and lists copied, tensors and other leaves shared."""
    if isinstance(value, dict):
        return {key: _containers_copied(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_containers_copied(item) for item in value]
    return value
