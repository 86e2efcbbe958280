"""The trainer's verdicts on this worker's submissions, as its console shows them: `Tally`.

Each verdict is logged with the lease's completions and speed, then what the worker has
contributed so far: completions in accepted leases, completions rejected (by reason), and the
accepted share of everything it sent. The trainer's ledger is the authority (`swarmrl status`,
`swarmrl ledger export`): from a worker it has not yet proven honest it credits only groups
with a reward spread, so it may count fewer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from swarmrl.protocol import messages as m

log = logging.getLogger("worker")


@dataclass
class Tally:
    accepted: int = 0  # completions
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # rejected completions per reason

    def record(
        self, verdict: m.Accept | m.Reject, completions: int, tokens: int, took: float
    ) -> None:
        """Count a verdict on a lease of `completions` (`tokens` generated in `took` s); log it."""
        lease = verdict.lease_id
        if isinstance(verdict, m.Accept):
            self.accepted += completions
            speed = f"{tokens} tokens in {took:.1f}s ({tokens / max(took, 1e-6):.0f} tok/s)"
            log.info(
                "lease %s: %d completions, %s, accepted; %s",
                lease,
                completions,
                speed,
                self.summary(),
            )
        else:
            self.rejected += completions
            self.reasons[verdict.reason] = self.reasons.get(verdict.reason, 0) + completions
            log.warning(
                "lease %s rejected: %s (%s); %s",
                lease,
                verdict.reason,
                verdict.detail,
                self.summary(),
            )

    def summary(self) -> str:
        """`so far 48 accepted, 8 rejected (stale_version 8): 86% of what this worker sent`."""
        sent = self.accepted + self.rejected
        text = f"so far {self.accepted} accepted, {self.rejected} rejected"
        if self.reasons:
            ranked = sorted(self.reasons.items(), key=lambda item: (-item[1], item[0]))
            text += " (" + ", ".join(f"{reason} {count}" for reason, count in ranked) + ")"
        return text + f": {100 * self.accepted / max(sent, 1):.0f}% of what this worker sent"
