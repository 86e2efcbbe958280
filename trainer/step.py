"""One optimizer step on a batch of scored groups: pack, forward, GRPO loss, backward, clip, step.

Sequences are sorted by length and cut into micro-batches, so padding stays small as answers
shorten; every micro-batch is normalised against the whole step (see `aggregate_loss`), so the
gradient equals one pass over the full batch. Prompts are left-padded and completions
right-padded, so all completions start at the same column and only those logits are kept.
The forward pass also yields the trainer's own log-probs of every sampled token: they are
compared with the worker's reported ones for free (verify.logprob_verdict), and a sequence that
fails is masked out of the loss before backward and returned as a LogprobMismatch.
`train_step` is built from pieces (`step_sequences`, `accumulate_gradients`, `apply_gradients`)
that the sharded trainer (distributed.py) runs with each rank holding part of the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from swarmrl.base.config import Config
from swarmrl.trainer.buffer import ScoredGroup
from swarmrl.trainer.episodes import model_token_mask
from swarmrl.trainer.grpo import (
    BatchNormaliser,
    LossConfig,
    aggregate_loss,
    entropy_from_logits,
    group_advantages,
    per_token_loss,
    sequence_logprobs_from_logits,
)
from swarmrl.trainer.logprob_check import LogprobBand, LogprobMismatch, logprob_verdict
from swarmrl.trainer.schedule import learning_rate, set_learning_rate

if TYPE_CHECKING:
    import torch


@dataclass
class Sequence:
    prompt: list[int]
    completion: list[int]
    behavior_logprobs: list[float]
    advantage: float
    worker_id: str = ""
    prompt_index: int = -1
    lag: int = 0  # trainer version minus the version it was sampled with
    truncated: bool = False  # cut off at max_completion_length
    masked: bool = False  # no loss (mask_truncated_completions)
    # An episode's turns (model, environment, model, ...; [] single-turn): the environment's
    # tokens stay in the forward pass's context, out of the loss and the log-prob check.
    turn_lengths: list[int] = field(default_factory=list)
    position: int = -1  # in the step's length-sorted order: keys its log-probs across iterations

    def model_mask(self) -> list[float]:
        """1.0 for each completion token the model sampled, 0.0 for the environment's."""
        return model_token_mask(len(self.completion), self.turn_lengths)

    def model_turns(self) -> int:
        return (len(self.turn_lengths) + 1) // 2 or 1


def flatten(groups: list[ScoredGroup], config: Config, version: int) -> list[Sequence]:
    import torch

    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
    group_size = config.sampling.num_generations
    advantages = group_advantages(rewards, group_size, config.trainer.scale_rewards).tolist()
    mask_truncated = config.trainer.mask_truncated_completions
    sequences, k = [], 0
    for group in groups:
        truncated = group.truncated or [False] * len(group.rewards)
        turns = group.turn_lengths or [[] for _ in group.rewards]
        for ids, logprobs, cut, lengths in zip(
            group.completion_token_ids, group.behavior_logprobs, truncated, turns, strict=True
        ):
            sequences.append(
                Sequence(
                    group.prompt_token_ids,
                    ids,
                    logprobs,
                    advantages[k],
                    group.worker_id,
                    group.prompt_index,
                    version - group.policy_version,
                    truncated=cut,
                    masked=cut and mask_truncated,
                    turn_lengths=lengths,
                )
            )
            k += 1
    return sequences


def loss_config(config: Config) -> LossConfig:
    trainer = config.trainer
    return LossConfig(
        loss_type=trainer.loss_type,
        epsilon=trainer.epsilon,
        epsilon_high=trainer.clip_high,
        beta=trainer.beta,
        importance_sampling_level=trainer.importance_sampling_level,
        delta=trainer.delta,
        sapo_temperature_pos=trainer.sapo_temperature_pos,
        sapo_temperature_neg=trainer.sapo_temperature_neg,
        sampler_mode=trainer.vllm_importance_sampling_mode,
        sampler_clip_min=trainer.vllm_importance_sampling_clip_min,
        sampler_clip_max=trainer.vllm_importance_sampling_clip_max,
        max_completion_length=config.sampling.max_completion_length,
    )


def pad_batch(sequences: list[Sequence], pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    """Left-pad prompts, right-pad completions; return model inputs and per-token tensors."""
    import torch

    prompt_width = max(len(s.prompt) for s in sequences)
    completion_width = max(len(s.completion) for s in sequences)
    ids, attention, mask, behavior = [], [], [], []
    for s in sequences:
        left, right = prompt_width - len(s.prompt), completion_width - len(s.completion)
        ids.append([pad_id] * left + s.prompt + s.completion + [pad_id] * right)
        attention.append([0] * left + [1] * (len(s.prompt) + len(s.completion)) + [0] * right)
        mask.append([0.0] * len(s.completion) if s.masked else s.model_mask())
        mask[-1] += [0.0] * right
        behavior.append(s.behavior_logprobs + [0.0] * right)
    attention_mask = torch.tensor(attention, device=device)
    return {
        "input_ids": torch.tensor(ids, device=device),
        "attention_mask": attention_mask,
        # Positions count real tokens only, as during (left-padded) generation.
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "completion_ids": torch.tensor(
            [s.completion + [pad_id] * (completion_width - len(s.completion)) for s in sequences],
            device=device,
        ),
        "mask": torch.tensor(mask, device=device),
        "behavior_logprobs": torch.tensor(behavior, device=device),
        "advantages": torch.tensor([s.advantage for s in sequences], device=device),
        "lags": torch.tensor([s.lag for s in sequences], device=device),
    }


def completion_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits that predict each completion token: (B, completion width, vocab)."""
    width = batch["completion_ids"].shape[1]
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=width + 1,
    ).logits
    return logits[:, :-1]


def train_step(
    model: Any,
    optimizer: Any,
    groups: list[ScoredGroup],
    config: Config,
    pad_id: int,
    reference: Any | None = None,
    *,
    version: int,
    old_store: dict[int, list[float]] | None = None,
) -> tuple[dict[str, float], list[LogprobMismatch]]:
    """One step with the weights of `version`; returns its stats and the sequences that failed
    the log-prob check (masked out of the loss). `old_store`: see accumulate_gradients."""
    sequences = step_sequences(groups, config, version)
    normaliser = step_normaliser(sequences)
    size = config.trainer.micro_batch_size
    chunks = [sequences[start : start + size] for start in range(0, len(sequences), size)]
    model.train()
    totals, mismatches = accumulate_gradients(
        model, chunks, normaliser, config, pad_id, reference, old_store
    )
    totals.update(apply_gradients(model, optimizer, config, version))
    totals["learning_rate"] = learning_rate(config.trainer, version)
    model.eval()
    return {**totals, **step_summary(sequences, normaliser)}, mismatches


def step_sequences(groups: list[ScoredGroup], config: Config, version: int) -> list[Sequence]:
    """The step's sequences with their group advantages, shortest first (little padding)."""
    ordered = sorted(flatten(groups, config, version), key=lambda s: len(s.prompt + s.completion))
    for position, sequence in enumerate(ordered):
        sequence.position = position
    return ordered


def step_normaliser(sequences: list[Sequence]) -> BatchNormaliser:
    """Whole-step counts: each micro-batch's loss is divided by these, wherever it runs (the
    tokens of sequences masked for truncation do not count, as in TRL, nor do environment
    tokens)."""
    return BatchNormaliser(
        num_sequences=len(sequences),
        num_tokens=int(sum(sum(s.model_mask()) for s in sequences if not s.masked)),
    )


def accumulate_gradients(
    model: Any,
    micro_batches: list[list[Sequence]],
    normaliser: BatchNormaliser,
    config: Config,
    pad_id: int,
    reference: Any | None = None,
    old_store: dict[int, list[float]] | None = None,
) -> tuple[dict[str, float], list[LogprobMismatch]]:
    """Forward and backward each micro-batch; return its loss and stats summed over them, and
    the sequences that failed the log-prob check. `old_store` (num_iterations > 1): the
    policy's log-probs at the batch's first iteration, by sequence position; filled on that
    iteration, the base of the clipped ratio on the later ones, as in TRL.

    Stats are weighted by each micro-batch's share of `normaliser.num_tokens`, so summing the
    result of several calls (several ranks holding parts of one step) gives the step's values.
    A sequence that fails the check still counts in `normaliser`: a step with rejects is
    proportionally smaller.
    """
    import torch

    settings = loss_config(config)
    temperature = config.sampling.temperature
    device = next(model.parameters()).device
    band = LogprobBand.from_config(config)
    totals: dict[str, float] = {"logprob_rejected": 0.0}
    mismatches: list[LogprobMismatch] = []
    for chunk in micro_batches:
        batch, logits, logprobs, failed = checked_forward(
            model, chunk, pad_id, device, temperature, band
        )
        mismatches += failed
        totals["logprob_rejected"] += len(failed)
        ref_logprobs = None
        if reference is not None:
            with torch.no_grad():
                ref_logits = completion_logits(reference, batch)
                ref_logprobs = sequence_logprobs_from_logits(
                    ref_logits, batch["completion_ids"], temperature
                )
        token_loss, stats = per_token_loss(
            logprobs,
            first_iteration_logprobs(chunk, logprobs, old_store),
            batch["behavior_logprobs"],
            batch["advantages"],
            batch["mask"],
            settings,
            ref_logprobs=ref_logprobs,
        )
        loss = aggregate_loss(token_loss, batch["mask"], settings, normaliser)
        loss.backward()
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach(), temperature)
            tokens = batch["mask"].sum().item()
            stats["entropy"] = (entropy * batch["mask"]).sum() / max(tokens, 1.0)
        weight = tokens / max(normaliser.num_tokens, 1)
        totals["loss"] = totals.get("loss", 0.0) + loss.item()
        for name, value in stats.items():
            totals[name] = totals.get(name, 0.0) + float(value) * weight
    return totals, mismatches


def first_iteration_logprobs(
    chunk: list[Sequence], logprobs: torch.Tensor, old_store: dict[int, list[float]] | None
) -> torch.Tensor:
    """The ratio's base: this iteration's log-probs (detached) on a batch's first iteration,
    which are kept in `old_store`, and the kept ones on every later iteration."""
    import torch

    old = logprobs.detach()
    if old_store is None:
        return old
    if all(s.position in old_store for s in chunk):
        width = old.shape[1]
        rows = [old_store[s.position] for s in chunk]
        return torch.tensor([r + [0.0] * (width - len(r)) for r in rows], device=old.device)
    for row, sequence in enumerate(chunk):
        old_store[sequence.position] = old[row, : len(sequence.completion)].tolist()
    return old


def screen_groups(
    model: Any, groups: list[ScoredGroup], config: Config, pad_id: int, version: int
) -> list[LogprobMismatch]:
    """The log-prob check alone (a forward without gradients): the sequences of `groups` whose
    reported log-probs the trainer's own do not back. For groups from workers not yet known to
    be honest, before they may take a slot in a step."""
    import torch

    sequences = step_sequences(groups, config, version)
    size = config.trainer.micro_batch_size
    device, temperature = next(model.parameters()).device, config.sampling.temperature
    band = LogprobBand.from_config(config)
    failed: list[LogprobMismatch] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), size):
            chunk = sequences[start : start + size]
            failed += checked_forward(model, chunk, pad_id, device, temperature, band)[3]
    return failed


def checked_forward(
    model: Any,
    chunk: list[Sequence],
    pad_id: int,
    device: Any,
    temperature: float,
    band: LogprobBand,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, list[LogprobMismatch]]:
    """One micro-batch's forward: (inputs, logits, the trainer's log-probs of the sampled
    tokens, the sequences that failed the log-prob check, already masked out of `inputs`)."""
    batch = pad_batch(chunk, pad_id, device)
    logits = completion_logits(model, batch)
    logprobs = sequence_logprobs_from_logits(logits, batch["completion_ids"], temperature)
    return batch, logits, logprobs, mask_logprob_mismatches(chunk, logprobs, batch, band)


def mask_logprob_mismatches(
    chunk: list[Sequence], logprobs: torch.Tensor, batch: dict[str, torch.Tensor], band: LogprobBand
) -> list[LogprobMismatch]:
    """Zero the loss mask of every sequence whose reported log-probs fail the check; return them."""
    verdict = logprob_verdict(
        logprobs, batch["behavior_logprobs"], batch["mask"], batch["lags"], band
    )
    batch["mask"] = batch["mask"] * (~verdict.failed).unsqueeze(1)
    return [
        LogprobMismatch(
            chunk[row].worker_id,
            chunk[row].prompt_index,
            chunk[row].lag,
            float(verdict.mean_gap[row]),
            float(verdict.max_gap[row]),
        )
        for row in verdict.failed.nonzero().flatten().tolist()
    ]


def apply_gradients(model: Any, optimizer: Any, config: Config, version: int) -> dict[str, float]:
    """Clip the accumulated gradients, step the optimizer at the scheduled learning rate of
    step `version`, clear them; return the grad norm and the seconds this took (the
    optimizer's share of a step: DeMo's transform and encoding happen here)."""
    import torch

    started = time.monotonic()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.trainer.max_grad_norm)
    set_learning_rate(optimizer, config.trainer, version)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # Under FSDP the norm is a DTensor (already reduced over the ranks): take its full value.
    full = getattr(grad_norm, "full_tensor", None)
    norm = float(full() if full is not None else grad_norm)
    return {"grad_norm": norm, "optimizer_seconds": time.monotonic() - started}


def step_summary(sequences: list[Sequence], normaliser: BatchNormaliser) -> dict[str, float]:
    return {
        "sequences": float(len(sequences)),
        "completion_tokens": float(normaliser.num_tokens),
        "completion_length": sum(len(s.completion) for s in sequences) / max(len(sequences), 1),
        "truncated_fraction": sum(s.truncated for s in sequences) / max(len(sequences), 1),
        "model_turns": sum(s.model_turns() for s in sequences) / max(len(sequences), 1),
        # Of the completions' tokens, those an environment wrote (0 in a single-turn run).
        "environment_token_fraction": 1.0
        - sum(sum(s.model_mask()) for s in sequences)
        / max(sum(len(s.completion) for s in sequences), 1),
    }
