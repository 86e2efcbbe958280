"""One optimizer step on a batch of scored groups: pack, forward, GRPO loss, backward, clip, step.

Sequences are sorted by length and cut into micro-batches, so padding stays small as answers
shorten; every micro-batch is normalised against the whole step (see `aggregate_loss`), so the
gradient equals one pass over the full batch. Prompts are left-padded and completions
right-padded, so all completions start at the same column and only those logits are kept.
The forward pass also yields the trainer's own log-probs of every sampled token: the gap to the
worker's reported log-probs is measured here for free (see `behavior_logprob_gap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from swarmrl.config import Config
from swarmrl.trainer.buffer import ScoredGroup
from swarmrl.trainer.grpo import (
    BatchNormaliser,
    LossConfig,
    aggregate_loss,
    entropy_from_logits,
    group_advantages,
    per_token_loss,
    sequence_logprobs_from_logits,
)

if TYPE_CHECKING:
    import torch


@dataclass
class Sequence:
    prompt: list[int]
    completion: list[int]
    behavior_logprobs: list[float]
    advantage: float


def flatten(groups: list[ScoredGroup], config: Config) -> list[Sequence]:
    import torch

    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
    group_size = config.sampling.num_generations
    advantages = group_advantages(rewards, group_size, config.trainer.scale_rewards).tolist()
    sequences, k = [], 0
    for group in groups:
        for ids, logprobs in zip(group.completion_token_ids, group.behavior_logprobs, strict=True):
            sequences.append(Sequence(group.prompt_token_ids, ids, logprobs, advantages[k]))
            k += 1
    return sequences


def loss_config(config: Config) -> LossConfig:
    trainer = config.trainer
    return LossConfig(
        loss_type=trainer.loss_type,
        epsilon=trainer.epsilon,
        epsilon_high=trainer.clip_high,
        beta=trainer.beta,
        tis_cap=trainer.tis_cap,
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
        mask.append([1.0] * len(s.completion) + [0.0] * right)
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
) -> dict[str, float]:
    import torch

    sequences = sorted(flatten(groups, config), key=lambda s: len(s.prompt) + len(s.completion))
    normaliser = BatchNormaliser(
        num_sequences=len(sequences), num_tokens=sum(len(s.completion) for s in sequences)
    )
    settings = loss_config(config)
    temperature = config.sampling.temperature
    device = next(model.parameters()).device
    size = config.trainer.micro_batch_size
    totals: dict[str, float] = {}
    model.train()
    for start in range(0, len(sequences), size):
        chunk = sequences[start : start + size]
        batch = pad_batch(chunk, pad_id, device)
        logits = completion_logits(model, batch)
        logprobs = sequence_logprobs_from_logits(logits, batch["completion_ids"], temperature)
        ref_logprobs = None
        if reference is not None:
            with torch.no_grad():
                ref_logits = completion_logits(reference, batch)
                ref_logprobs = sequence_logprobs_from_logits(
                    ref_logits, batch["completion_ids"], temperature
                )
        token_loss, stats = per_token_loss(
            logprobs,
            logprobs.detach(),
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
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.trainer.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    totals["grad_norm"] = float(grad_norm)
    totals["sequences"] = float(len(sequences))
    totals["completion_tokens"] = float(normaliser.num_tokens)
    totals["completion_length"] = normaliser.num_tokens / max(len(sequences), 1)
    return totals
