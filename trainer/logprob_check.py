"""The training thread's check of a worker's log-probs against the trainer's own.

The log-probs the loss forward pass computes anyway are compared, sequence by sequence, with
the ones the worker reported (`logprob_verdict`): a sequence that fails is masked out of the
loss before backward (step.py), and its worker is charged (`logprob_mismatch`). Groups from
workers not yet proven honest are checked before they may take a slot in a step (screening).
How tight the band is follows from what the workers hold: exactly the trainer's float32
weights (strict), or bfloat16 somewhere (loose).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from swarmrl.base.config import Config
from swarmrl.protocol.codecs import codec_for

if TYPE_CHECKING:
    import torch


# The loose band, for bf16 on either side (measured noise: p95 0.10, max 0.5 per token): a
# sequence fails when its mean |gap| exceeds 0.1 or more than 5% of its tokens are off by > 0.5.
LOOSE_MEAN_GAP = 0.1
LOOSE_FAR_GAP = 0.5
LOOSE_FAR_FRACTION = 0.05


@dataclass(frozen=True)
class LogprobBand:
    """How far a worker's log-probs may be from the trainer's, per sequence.

    Sampled with the trainer's current weights (lag 0) the two must agree up to numerical
    noise: `strict` (float32 on both sides) fails a sequence if any token is off by more than
    `tolerance`; `loose` (bfloat16 somewhere) uses the LOOSE_* band. Sampled with older weights
    (lag >= 1), the gap also holds the policy's own movement since then (measured, worst
    sequence after one and two steps: AdamW at lr 2e-5 0.52 and 0.77, DeMo at lr 5e-5 0.07 and
    0.18), so such a sequence fails only when its mean |gap| exceeds `stale_tolerance`. `off`
    checks nothing.
    """

    mode: Literal["strict", "loose", "off"]
    tolerance: float
    stale_tolerance: float

    @classmethod
    def from_config(cls, config: Config) -> LogprobBand:
        trainer = config.trainer
        mode = trainer.logprob_check
        if mode == "auto":  # float32 on both sides, or bf16 somewhere (a codec may publish it)
            published = codec_for(trainer).published_dtype(config.model.dtype)
            mode = "strict" if published == "float32" else "loose"
        return cls(mode, trainer.logprob_tolerance, trainer.logprob_stale_tolerance)


@dataclass
class LogprobVerdict:
    """Per sequence (row): whether it failed the band, and its mean and largest |gap|."""

    failed: torch.Tensor
    mean_gap: torch.Tensor
    max_gap: torch.Tensor


@dataclass(frozen=True)
class LogprobMismatch:
    """A sequence the training step masked out, for the ledger and the log."""

    worker_id: str
    prompt_index: int
    lag: int
    mean_gap: float
    max_gap: float


def logprob_verdict(
    trainer_logprobs: torch.Tensor,
    worker_logprobs: torch.Tensor,
    mask: torch.Tensor,
    lags: torch.Tensor,
    band: LogprobBand,
) -> LogprobVerdict:
    """Judge each row of (B, T) log-probs; `mask` marks real tokens, `lags` is (B,)."""
    import torch

    real = mask > 0
    gap = torch.where(real, (trainer_logprobs.detach() - worker_logprobs).abs(), 0.0)
    tokens = real.sum(dim=1).clamp(min=1)
    mean_gap = gap.sum(dim=1) / tokens
    max_gap = gap.amax(dim=1)
    if band.mode == "off":
        return LogprobVerdict(torch.zeros_like(real[:, 0]), mean_gap, max_gap)
    if band.mode == "strict":
        fresh_failed = max_gap > band.tolerance
    else:
        far = (gap > LOOSE_FAR_GAP).sum(dim=1) / tokens
        fresh_failed = (mean_gap > LOOSE_MEAN_GAP) | (far > LOOSE_FAR_FRACTION)
    failed = torch.where(lags > 0, mean_gap > band.stale_tolerance, fresh_failed)
    return LogprobVerdict(failed, mean_gap, max_gap)
