"""What the trainer checks in a submission before any of it can reach the optimizer.

The worker is not trusted: its lease must match, its policy version must be the one it was
leased under and still within `max_staleness`, every prompt of the lease must come back with
exactly `num_generations` completions, each completion's token ids must be valid for the
tokenizer, within the length limit, and decode to the text the worker sent. The trainer scores
its own decoding of the token ids; rewards the worker reports are ignored. (The log-prob check
against the trainer's own forward pass happens in the training step.)
"""

from __future__ import annotations

from typing import Any

from swarmrl.config import Config
from swarmrl.protocol.messages import Submission
from swarmrl.trainer.leases import OpenLease, prompt_id


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
