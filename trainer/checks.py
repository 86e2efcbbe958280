"""What the network thread checks in a submission before any of it is scored.

The worker is not trusted: its lease must match, its policy version must be the one it was
leased under and still within `max_staleness`, every prompt of the lease must come back with
exactly `num_generations` completions, each completion's token ids must be valid for the
tokenizer, within the length limit, and decode to the text the worker sent. The trainer scores
its own decoding of the token ids (intake.py). A result accepted once is not accepted again
(`ReplayGuard`). What the training thread checks (the log-probs) is logprob_check.py's.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Any

from swarmrl.base.config import Config
from swarmrl.protocol.messages import Submission
from swarmrl.protocol.refusals import Refused
from swarmrl.trainer.leases import OpenLease, prompt_id


def check_submission(
    submission: Submission, lease: OpenLease, config: Config, current_version: int, tokenizer: Any
) -> list[list[str]]:
    """Raise Refused with a reject code, or return the trainer-decoded texts per group."""
    if submission.policy_version != lease.policy_version:
        raise Refused(
            "version_mismatch",
            f"lease {lease.lease_id} was issued for version {lease.policy_version}, "
            f"submission says {submission.policy_version}",
        )
    lag = current_version - submission.policy_version
    if lag > config.trainer.max_staleness:
        raise Refused(
            "stale_version",
            f"sampled with version {submission.policy_version}, trainer is at {current_version} "
            f"(max_staleness {config.trainer.max_staleness})",
        )
    expected = [prompt_id(i) for i in lease.prompt_indices]
    returned = [group.prompt_id for group in submission.groups]
    if returned != expected:
        raise Refused("wrong_prompts", f"expected prompts {expected}, got {returned}")
    size = config.sampling.num_generations
    max_length = config.sampling.max_completion_length
    vocabulary = len(tokenizer)
    texts = []
    for group in submission.groups:
        if len(group.completions) != size:
            raise Refused(
                "wrong_group_size",
                f"prompt {group.prompt_id}: {len(group.completions)} completions, expected {size}",
            )
        group_texts = []
        for completion in group.completions:
            ids = completion.token_ids
            if not 1 <= len(ids) <= max_length:
                raise Refused(
                    "bad_length", f"a completion has {len(ids)} tokens (allowed 1..{max_length})"
                )
            if min(ids) < 0 or max(ids) >= vocabulary:
                raise Refused("bad_token", f"token id outside 0..{vocabulary - 1}")
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if text != completion.text:
                raise Refused(
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
            raise Refused("duplicate", f"lease {lease_id} was already accepted")

    def check(self, submission: Submission, prompt_indices: list[int]) -> None:
        for group, index in zip(submission.groups, prompt_indices, strict=True):
            for number, key in enumerate(_completion_keys(group.completions, index)):
                if key in self._completions:
                    raise Refused(
                        "duplicate",
                        f"prompt {group.prompt_id}: completion {number} repeats one already "
                        "accepted for this prompt",
                    )

    def remember(
        self, submission: Submission, prompt_indices: list[int], done: set[int] | None = None
    ) -> None:
        """Remember an accepted submission: its lease, and the completions of its prompts that
        are `done` (all by default; a prompt leased again may be sampled alike)."""
        self._leases.add(submission.lease_id)
        for group, index in zip(submission.groups, prompt_indices, strict=True):
            if done is None or index in done:
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
