"""Why the trainer refuses something: the reject reason codes, and the one exception for them.

Every refusal a worker can receive is a `Reject(reason, detail)`; `reason` is one of REASONS.
The fault ones are those an honest, working worker never earns (a malformed message, a forged
or copied result); the others are bad luck or the swarm's own limits (a lease that expired, a
sample that went stale, no room). The ledger charges faults toward quarantine. `Refused` is
raised anywhere a message or a submission is turned down, carrying the code and a detail.
"""

from __future__ import annotations

# code -> whether it is a fault
REASONS: dict[str, bool] = {
    # the message itself (framing.decode, limits.Gate)
    "malformed": True,
    "invalid": True,
    "unknown_type": True,
    "too_many_frames": True,
    "too_large": True,
    "rate_limited": True,
    "bad_version": False,
    "unexpected": True,
    # who sent it
    "unknown_worker": False,
    "quarantined": False,
    "too_many_workers": False,
    # a work request
    "too_many_leases": False,
    "future_version": True,
    # a submission: the lease (leases.LeaseBook)
    "unknown_lease": False,
    "lease_expired": False,
    "not_your_lease": True,
    # a submission: its content (checks.py)
    "version_mismatch": True,
    "stale_version": False,
    "wrong_prompts": True,
    "wrong_group_size": True,
    "bad_length": True,
    "bad_token": True,
    "text_mismatch": True,
    "duplicate": True,
    # a multi-turn episode: the trainer re-runs its environment (trainer/episodes.py)
    "tool_output_mismatch": True,
    "environment_tokens_mismatch": True,
    "extra_turn": True,
    "too_many_turns": True,
    "episode_cut_short": True,
    # the training thread's log-prob check (logprob_check.py)
    "logprob_mismatch": True,
    # the trainer's own failure on a message
    "internal": False,
}
FAULTS = frozenset(code for code, fault in REASONS.items() if fault)


class Refused(Exception):
    """A message or submission turned down: `reason` (a REASONS code) and a human detail."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
