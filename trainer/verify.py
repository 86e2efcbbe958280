"""What the trainer checks in a submission before any of it can reach the optimizer.

The worker is not trusted: its lease must match, its policy version must be the one it was
leased under and still within `max_staleness`, every prompt of the lease must come back with
exactly `num_generations` completions, each completion's token ids must be valid for the
tokenizer, within the length limit, and decode to the text the worker sent. The trainer scores
its own decoding of the token ids; rewards the worker reports are ignored. A result accepted
once is not accepted again (`ReplayGuard`).

The log-prob check runs in the training step on the log-probs its loss forward pass computes
anyway (`logprob_verdict`): a sequence whose reported log-probs do not match the trainer's is
masked out of the loss before backward, and its worker is charged.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from swarmrl.config import Config
from swarmrl.protocol.messages import Submission
from swarmrl.trainer.leases import OpenLease, prompt_id

if TYPE_CHECKING:
    import torch


class SubmissionError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_submission(
    submission: Submission, lease: OpenLease, config: Config, current_version: int, tokenizer: Any
) -> list[list[str]]:
    """Raise SubmissionError with a reject code, or return the trainer-decoded texts per group."""
    if submission.policy_version != lease.policy_version:
        raise SubmissionError(
            "version_mismatch",
            f"lease {lease.lease_id} was issued for version {lease.policy_version}, "
            f"submission says {submission.policy_version}",
        )
    lag = current_version - submission.policy_version
    if lag > config.trainer.max_staleness:
        raise SubmissionError(
            "stale_version",
            f"sampled with version {submission.policy_version}, trainer is at {current_version} "
            f"(max_staleness {config.trainer.max_staleness})",
        )
    expected = [prompt_id(i) for i in lease.prompt_indices]
    returned = [group.prompt_id for group in submission.groups]
    if returned != expected:
        raise SubmissionError("wrong_prompts", f"expected prompts {expected}, got {returned}")
    size = config.sampling.num_generations
    max_length = config.sampling.max_completion_length
    vocabulary = len(tokenizer)
    texts = []
    for group in submission.groups:
        if len(group.completions) != size:
            raise SubmissionError(
                "wrong_group_size",
                f"prompt {group.prompt_id}: {len(group.completions)} completions, expected {size}",
            )
        group_texts = []
        for completion in group.completions:
            ids = completion.token_ids
            if not 1 <= len(ids) <= max_length:
                raise SubmissionError(
                    "bad_length", f"a completion has {len(ids)} tokens (allowed 1..{max_length})"
                )
            if min(ids) < 0 or max(ids) >= vocabulary:
                raise SubmissionError("bad_token", f"token id outside 0..{vocabulary - 1}")
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if text != completion.text:
                raise SubmissionError(
                    "text_mismatch",
                    f"token ids decode to {text[:60]!r}, submitted text is "
                    f"{completion.text[:60]!r}",
                )
            group_texts.append(text)
        texts.append(group_texts)
    return texts


class ReplayGuard:
    """Refuses a repeat of an accepted result: the same lease again, or a completion that was
    already accepted for the same prompt (index in the prompt stream).

    A completion is known by a hash of the prompt index, its token ids and its reported
    log-probs. The log-probs are part of it on purpose: an honest worker that samples a short,
    confident answer ("57<eos>") for a prompt leased again repeats its token ids, but with
    newer weights, so not its log-probs to the last bit; a copy repeats both. (A prompt comes
    back after its accepted group went stale or was dropped with a quarantined worker's.)
    """

    def __init__(self) -> None:
        self._leases: set[str] = set()
        self._completions: set[bytes] = set()

    def check_lease(self, lease_id: str) -> None:
        if lease_id in self._leases:
            raise SubmissionError("duplicate", f"lease {lease_id} was already accepted")

    def check(self, submission: Submission, prompt_indices: list[int]) -> None:
        for group, index in zip(submission.groups, prompt_indices, strict=True):
            for number, key in enumerate(_completion_keys(group.completions, index)):
                if key in self._completions:
                    raise SubmissionError(
                        "duplicate",
                        f"prompt {group.prompt_id}: completion {number} repeats one already "
                        "accepted for this prompt",
                    )

    def remember(self, submission: Submission, prompt_indices: list[int]) -> None:
        self._leases.add(submission.lease_id)
        for group, index in zip(submission.groups, prompt_indices, strict=True):
            self._completions.update(_completion_keys(group.completions, index))


def _completion_keys(completions: list[Any], prompt_index: int) -> list[bytes]:
    prefix = prompt_index.to_bytes(8, "little")
    return [
        hashlib.blake2b(
            prefix + array("q", c.token_ids).tobytes() + array("d", c.logprobs).tobytes(),
            digest_size=16,
        ).digest()
        for c in completions
    ]


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
        if mode == "auto":  # the sparse codec's workers hold bf16 weights
            fp32_workers = config.model.dtype == "float32" and trainer.codec != "sparse"
            mode = "strict" if fp32_workers else "loose"
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
