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
corrected by a detached weight ``exp(old - behavior)``, truncated or masked outside
``[clip_min, clip_max]``, per token or per sequence (TRL's ``vllm_importance_sampling_mode``).

Aggregation divides by whole-step counts (``BatchNormaliser``), so summing ``aggregate_loss``
over the micro-batches of a gradient-accumulation step equals the loss of the whole step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, get_args

import torch

from swarmrl.base.config import ImportanceLevel, LossType, SamplerCorrection, ScaleRewards

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
    epsilon_high: float = 0.2  # upper clip 1 + epsilon_high; CISPO: the cap itself (TRL)
    beta: float = 0.0  # KL coefficient against a reference model (k3 estimator)
    importance_sampling_level: ImportanceLevel = "token"  # "sequence": GSPO
    delta: float | None = None  # INTELLECT-2: cap the unclipped ratio at delta
    sapo_temperature_pos: float = 1.0  # SAPO's gate sharpness for positive advantages
    sapo_temperature_neg: float = 1.05  # ... and for negative ones
    sampler_mode: SamplerCorrection = "token_truncate"  # the worker's policy (TRL: vllm_...)
    sampler_clip_min: float | None = None
    sampler_clip_max: float | None = 2.0
    max_completion_length: int = 256  # dr_grpo's constant normaliser

    def __post_init__(self) -> None:
        if self.loss_type not in get_args(LossType):
            raise ValueError(f"unknown loss_type {self.loss_type!r}")
        if not 0.0 <= self.epsilon < 1.0 or self.epsilon_high < 0.0:
            raise ValueError("need 0 <= epsilon < 1 and epsilon_high >= 0")
        if self.beta < 0.0 or self.max_completion_length < 1:
            raise ValueError("need beta >= 0 and max_completion_length >= 1")
        if self.sampler_mode.endswith("truncate") and self.sampler_clip_max is None:
            raise ValueError(f"{self.sampler_mode} needs a clip_max")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = x.expand_as(mask) if x.shape != mask.shape else x
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).detach()


def importance_ratio(
    logprobs: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, level: ImportanceLevel
) -> torch.Tensor:
    """pi/pi_old per token (B, T), or per sequence (B, 1): GSPO's exp(mean log-ratio)."""
    log_ratio = logprobs - old
    if level == "token":
        return torch.exp(log_ratio)
    mean = (log_ratio * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return torch.exp(mean).unsqueeze(1)


def policy_loss(
    ratio: torch.Tensor, logprobs: torch.Tensor, adv: torch.Tensor, config: LossConfig
) -> torch.Tensor:
    """The surrogate each loss type minimises, per token (broadcast from (B, 1) if need be).

    - PPO-style clip (grpo, dr_grpo, dapo, bnpo): -min(r A, clip(r, 1-eps, 1+eps_high) A), with
      INTELLECT-2's `delta` capping the unclipped r;
    - CISPO: -sg(min(r, eps_high)) A log pi (the gradient goes through the log-prob only);
    - SAPO: -sigmoid(tau (r - 1)) 4 / tau A, tau by the sign of A (a soft, smooth clip).
    """
    if config.loss_type == "cispo":
        return -torch.clamp(ratio, max=config.epsilon_high).detach() * adv * logprobs
    if config.loss_type == "sapo":
        tau = torch.where(adv > 0, config.sapo_temperature_pos, config.sapo_temperature_neg)
        return -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv
    clipped = torch.clamp(ratio, 1.0 - config.epsilon, 1.0 + config.epsilon_high)
    unclipped = ratio if config.delta is None else torch.clamp(ratio, max=config.delta)
    return -torch.min(unclipped * adv, clipped * adv)


def sampler_weight(
    old: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor, config: LossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The detached weight pi_old / pi_worker that corrects for the worker's (stale) policy,
    per token (B, T) or per sequence (B, 1, the product over its tokens), truncated to
    [clip_min, clip_max] or masked (0) outside it; and where it was truncated or masked.
    A log-prob that is NaN or at padding counts as no mismatch (weight 1), as in TRL."""
    gap = torch.nan_to_num((old - behavior) * mask, nan=0.0)
    if config.sampler_mode.startswith("sequence"):
        gap = gap.sum(dim=1, keepdim=True)
    raw = torch.exp(gap)
    low = -math.inf if config.sampler_clip_min is None else config.sampler_clip_min
    high = math.inf if config.sampler_clip_max is None else config.sampler_clip_max
    outside = (raw < low) | (raw > high)
    if config.sampler_mode.endswith("truncate"):
        return torch.clamp(raw, min=low, max=high), outside
    return torch.where(outside, 0.0, raw), outside


def per_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss per token (B, T), zero at padding, and detached scalar stats.

    Gradient flows through ``logprobs`` only; every other tensor is detached here.
    """
    if config.beta > 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0")
    mask = mask.to(logprobs.dtype)
    old = old_logprobs.detach()
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(1)  # (B, 1)

    ratio = importance_ratio(logprobs, old, mask, config.importance_sampling_level)
    weight, outside = sampler_weight(old, behavior_logprobs.detach(), mask, config)
    loss = policy_loss(ratio, logprobs, adv, config) * weight

    stats = {
        "clip_ratio_low": _masked_mean(((ratio < 1.0 - config.epsilon) & (adv < 0)).float(), mask),
        "clip_ratio_high": _masked_mean(
            ((ratio > 1.0 + config.epsilon_high) & (adv > 0)).float(), mask
        ),
        "is_weight_mean": _masked_mean(weight, mask),
        "is_truncated_frac": _masked_mean(outside.float(), mask),
        "behavior_logprob_gap": _masked_mean(
            torch.nan_to_num((old - behavior_logprobs.detach()).abs(), nan=0.0), mask
        ),
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

    - "grpo", "sapo": mean over each sequence's real tokens, summed, / num_sequences of the step.
    - "bnpo", "dapo", "cispo": sum over real tokens / num_tokens of the step. In TRL bnpo and
      dapo differ only across processes (bnpo: local tokens, dapo: global tokens); with one
      trainer process both are the step's token count, so they are the same here.
    - "dr_grpo": sum over real tokens / (num_sequences * max_completion_length).

    A sequence with no real token contributes zero (never NaN).
    """
    mask = mask.to(token_loss.dtype)
    masked = token_loss * mask
    if config.loss_type in ("grpo", "sapo"):
        per_sequence = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return per_sequence.sum() / max(normaliser.num_sequences, 1)
    if config.loss_type in ("bnpo", "dapo", "cispo"):
        return masked.sum() / max(normaliser.num_tokens, 1)
    if config.loss_type == "dr_grpo":
        return masked.sum() / (max(normaliser.num_sequences, 1) * config.max_completion_length)
    raise ValueError(f"unknown loss_type {config.loss_type!r}")


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float) -> float:
    """DAPO's soft overlong punishment (verl `overlong_buffer`): 0 up to max_length - buffer,
    then falling linearly to -factor at max_length."""
    if buffer <= 0:
        return 0.0
    return min(-(length - (max_length - buffer)) / buffer * factor, 0.0)


def _check_temperature(temperature: float) -> None:
    if temperature <= 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def sequence_logprobs_from_logits(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log_softmax(logits / temperature) gathered at token_ids: (B, T, V) -> (B, T), float32.

    ``logits[:, t]`` must predict ``token_ids[:, t]``. Works on chunks of rows as
    ``gathered - logsumexp`` in float32, so no full-size log_softmax (or float32 copy of
    bf16 logits) is materialised at once, neither forward nor backward. Differentiable.
    """
    _check_temperature(temperature)
    return _TokenLogprobs.apply(logits, token_ids, temperature)


class _TokenLogprobs(torch.autograd.Function):
    """The log-probs of `sequence_logprobs_from_logits` and their exact gradient.

    Autograd through ``s = logits.float() / t; gather(s) - logsumexp(s)`` would keep every
    chunk's ``s`` (another logits-sized tensor) and build the gradient in logits-sized steps
    (the chunks', their concatenation, its division by t). This keeps the logits and the
    logsumexp and recomputes ``s`` chunk by chunk in backward, with autograd's own formulas
    (``g`` at the token plus ``-g * exp(s - lse)``, divided by t), so the
    gradient is bit for bit the one autograd gives (tests/test_grpo.py).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, token_ids: torch.Tensor, temperature: float):
        flat = logits.reshape(-1, logits.shape[-1])
        flat_ids = token_ids.reshape(-1, 1)
        chunks, normalisers = [], []
        for rows, ids in zip(flat.split(_CHUNK_ROWS), flat_ids.split(_CHUNK_ROWS), strict=True):
            scaled = rows.float() / temperature
            normalisers.append(torch.logsumexp(scaled, dim=-1))
            chunks.append(scaled.gather(-1, ids).squeeze(-1) - normalisers[-1])
        ctx.save_for_backward(logits, token_ids, torch.cat(normalisers))
        ctx.temperature = temperature
        return torch.cat(chunks).view(token_ids.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, token_ids, normalisers = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        flat_ids, flat_grad = token_ids.reshape(-1, 1), grad.reshape(-1, 1)
        result = torch.empty_like(flat)
        for start in range(0, flat.shape[0], _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            scaled = flat[rows].float() / ctx.temperature
            g = flat_grad[rows]
            chunk = torch.zeros_like(scaled).scatter_add_(-1, flat_ids[rows], g)  # gather's
            chunk += -g * (scaled - normalisers[rows].unsqueeze(-1)).exp()  # logsumexp's
            result[rows] = chunk / ctx.temperature
        return result.view(logits.shape), None, None


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
