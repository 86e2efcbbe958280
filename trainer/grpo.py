"""GRPO maths: group advantages, the clipped per-token loss, its aggregation, and log-probs.

This module owns the numbers of one optimisation step and nothing else (no model, no
optimiser, no I/O). Names and semantics follow TRL's ``GRPOTrainer`` (``_compute_loss`` and
the advantage computation in ``_generate_and_score_completions``), with TRL's vLLM
importance-sampling correction ("token_truncate") applied to our asynchronous rollout
workers, whose weights may be a few versions behind the trainer:

- ``logprobs``: the current policy, with grad.
- ``old_logprobs``: the policy at the start of this optimisation step (the PPO ratio's base).
- ``behavior_logprobs``: what the rollout worker that sampled the tokens reported.

The PPO ratio ``exp(logprobs - old_logprobs)`` is clipped as usual; the sampler mismatch is
corrected by the detached truncated weight ``min(exp(old - behavior), tis_cap)``.

Aggregation divides by whole-step counts (``BatchNormaliser``), so summing ``aggregate_loss``
over the micro-batches of a gradient-accumulation step equals the loss of the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch

from swarmrl.base.config import LossType, ScaleRewards

STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
_CHUNK_ROWS = 128  # rows of (B*T, V) logits turned into float32 at a time


def _std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std as TRL; zero (not NaN) when there is a single sample."""
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:
        return torch.zeros_like(x.mean() if dim is None else x.mean(dim=dim))
    return x.std() if dim is None else x.std(dim=dim)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: ScaleRewards
) -> torch.Tensor:
    """A = r - mean(group), optionally divided by (std + 1e-4) of the group or of the batch.

    ``rewards`` is 1-D with groups contiguous: ``[g0_0 .. g0_{G-1}, g1_0 ..]``.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        std = _std(grouped, dim=1).repeat_interleave(group_size)
    elif scale_rewards == "batch":
        std = _std(rewards)
    elif scale_rewards == "none":
        return advantages
    else:
        raise ValueError(
            f"scale_rewards must be one of {get_args(ScaleRewards)}, got {scale_rewards!r}"
        )
    return advantages / (std + STD_EPS)


@dataclass(frozen=True)
class LossConfig:
    loss_type: LossType = "dapo"
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float = 0.2  # upper clip: ratio <= 1 + epsilon_high (TRL: defaults to epsilon)
    beta: float = 0.0  # KL coefficient against a reference model (k3 estimator)
    tis_cap: float = 2.0  # truncated importance sampling cap for the behaviour-policy correction
    max_completion_length: int = 256  # dr_grpo's constant normaliser

    def __post_init__(self) -> None:
        if self.loss_type not in get_args(LossType):
            raise ValueError(f"unknown loss_type {self.loss_type!r}")
        if not 0.0 <= self.epsilon < 1.0 or self.epsilon_high < 0.0:
            raise ValueError("need 0 <= epsilon < 1 and epsilon_high >= 0")
        if self.beta < 0.0 or self.tis_cap <= 0.0 or self.max_completion_length < 1:
            raise ValueError("need beta >= 0, tis_cap > 0 and max_completion_length >= 1")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).detach()


def per_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate loss per token (B, T), zero at padding, and detached scalar stats.

    Gradient flows through ``logprobs`` only; every other tensor is detached here.
    A behaviour log-prob that is NaN (unavailable) or sits at padding counts as no mismatch
    (weight 1), as in TRL.
    """
    if config.beta > 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0")
    mask = mask.to(logprobs.dtype)
    old = old_logprobs.detach()
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(1)  # (B, 1)

    ratio = torch.exp(logprobs - old)
    clipped = torch.clamp(ratio, 1.0 - config.epsilon, 1.0 + config.epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)

    # Truncated importance sampling: trainer's old policy vs the (stale) sampling policy.
    behavior_gap = torch.nan_to_num((old - behavior_logprobs.detach()) * mask, nan=0.0)
    raw_weight = torch.exp(behavior_gap)
    is_weight = torch.clamp(raw_weight, max=config.tis_cap)
    loss = loss * is_weight

    stats = {
        "clip_ratio_low": _masked_mean(((ratio < 1.0 - config.epsilon) & (adv < 0)).float(), mask),
        "clip_ratio_high": _masked_mean(
            ((ratio > 1.0 + config.epsilon_high) & (adv > 0)).float(), mask
        ),
        "is_weight_mean": _masked_mean(is_weight, mask),
        "is_truncated_frac": _masked_mean((raw_weight > config.tis_cap).float(), mask),
        "behavior_logprob_gap": _masked_mean(behavior_gap.abs(), mask),
    }

    if config.beta > 0.0 and ref_logprobs is not None:  # None with beta > 0 was rejected above
        ref_gap = ref_logprobs.detach() - logprobs
        kl = torch.exp(ref_gap) - ref_gap - 1.0  # k3 estimator of KL(pi || ref)
        loss = loss + config.beta * kl
        stats["kl"] = _masked_mean(kl, mask)

    return loss * mask, stats


@dataclass(frozen=True)
class BatchNormaliser:
    num_sequences: int  # sequences in the whole optimisation step (all micro-batches together)
    num_tokens: int  # real completion tokens in the whole step


def aggregate_loss(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    normaliser: BatchNormaliser,
) -> torch.Tensor:
    """Scalar loss of one micro-batch, scaled so the micro-batches of a step sum to its loss.

    - "grpo": mean over each sequence's real tokens, summed, / num_sequences of the step.
    - "bnpo", "dapo": sum over real tokens / num_tokens of the step. In TRL they differ only
      across processes (bnpo: local tokens, dapo: global tokens); with one trainer process
      both are the step's token count, so they are the same here. Both names are kept.
    - "dr_grpo": sum over real tokens / (num_sequences * max_completion_length).

    A sequence with no real token contributes zero (never NaN).
    """
    mask = mask.to(token_loss.dtype)
    masked = token_loss * mask
    if config.loss_type == "grpo":
        per_sequence = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return per_sequence.sum() / max(normaliser.num_sequences, 1)
    if config.loss_type in ("bnpo", "dapo"):
        return masked.sum() / max(normaliser.num_tokens, 1)
    if config.loss_type == "dr_grpo":
        return masked.sum() / (max(normaliser.num_sequences, 1) * config.max_completion_length)
    raise ValueError(f"unknown loss_type {config.loss_type!r}")


def _check_temperature(temperature: float) -> None:
    if temperature <= 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def sequence_logprobs_from_logits(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at token_ids: (B, T, V) -> (B, T), float32.

    ``logits[:, t]`` must predict ``token_ids[:, t]``. Works on chunks of rows as
    ``gathered - logsumexp`` in float32, so no full-size log_softmax (or float32 copy of
    bf16 logits) is materialised at once. Differentiable.
    """
    _check_temperature(temperature)
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_ids = token_ids.reshape(-1, 1)
    chunks = []
    for rows, ids in zip(flat_logits.split(_CHUNK_ROWS), flat_ids.split(_CHUNK_ROWS), strict=True):
        scaled = rows.float() / temperature
        chunks.append(scaled.gather(-1, ids).squeeze(-1) - torch.logsumexp(scaled, dim=-1))
    return torch.cat(chunks).view(token_ids.shape)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token entropy (nats) of softmax(logits / temperature): (B, T, V) -> (B, T), float32."""
    _check_temperature(temperature)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    chunks = []
    for rows in flat_logits.split(_CHUNK_ROWS):
        probs = torch.softmax(rows.float() / temperature, dim=-1)
        chunks.append(-torch.special.xlogy(probs, probs).sum(dim=-1))  # 0 * log 0 = 0
    return torch.cat(chunks).view(logits.shape[:-1])
