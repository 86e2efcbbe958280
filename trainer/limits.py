"""What a connection may send the trainer: how many messages per second, and how big.

The server reads every worker through one ROUTER socket, which libzmq drains fairly (one
message per connection with something queued, in turn), so a flooding connection can only
slow the others down by the work each of its messages costs. These limits keep that work
small and flat: a message over its connection's rate (a token bucket) or over the size any
honest message can have is refused before it is decoded. ZeroMQ's `MAXMSGSIZE`
(`swarm.max_message_mb`) drops a connection that sends a bigger frame still; the schema
(protocol/messages.py) bounds every string and list of what is decoded.

Connections that never said hello (strangers: identities cost nothing to make) share one
budget: a message from one is dropped unread and unanswered when it is bigger than a hello
or the budget is spent, so what strangers make the trainer do is O(1) per frame. Hellos are
budgeted per address too.
"""

from __future__ import annotations

from typing import Any

from swarmrl.base.config import Config
from swarmrl.protocol.refusals import Refused

# Hello, work requests, heartbeats and byes are a few hundred bytes: anything above this must
# be a submission, and is read only from a worker that holds a lease to submit.
HELLO_BYTES = 4096  # the most a stranger's message may be: only a hello is read from one
STRANGER_RATE, STRANGER_BURST = 200.0, 400  # messages per second from all strangers together
HELLO_RATE, HELLO_BURST = 1.0, 10  # hellos per second from one address
SMALL_MESSAGE_BYTES = 64 * 2**10
# msgpack: a token id takes at most 5 bytes, a float64 log-prob 9, per-completion fields and
# keys about 100, per-group and per-message about 200 and 1000.
_TOKEN_BYTES, _COMPLETION_BYTES, _GROUP_BYTES, _MESSAGE_BYTES = 14, 100, 200, 1000


class TokenBucket:
    """`burst` messages at once, refilled at `rate` per second."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now


class RateLimiter:
    """One token bucket per connection (ZeroMQ identity), including ones that never said hello."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: dict[bytes, TokenBucket] = {}

    def allow(self, identity: bytes, now: float) -> bool:
        bucket = self.buckets.get(identity)
        if bucket is None:
            bucket = self.buckets[identity] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def forget_idle(self, now: float) -> None:
        """Drop buckets that have refilled: a full bucket is the same as a new one."""
        for identity in [i for i, bucket in self.buckets.items() if bucket.full(now)]:
            del self.buckets[identity]


class Gate:
    """Whether a message is read at all: decided from its sender and size, before decoding."""

    def __init__(self, config: Config, tokenizer: Any) -> None:
        swarm = config.swarm
        self.limiter = RateLimiter(swarm.rate_limit_per_s, swarm.rate_limit_burst)
        self.strangers = TokenBucket(STRANGER_RATE, STRANGER_BURST, now=0.0)
        self.hellos = RateLimiter(HELLO_RATE, HELLO_BURST)  # keyed by address
        self.max_message_bytes = largest_submission_bytes(config, tokenizer)

    def read_stranger(self, size: int, now: float) -> bool:
        """Whether to read a message from a connection that has not said hello (else drop it)."""
        return size <= HELLO_BYTES and self.strangers.take(now)

    def hello_refusal(self, address: str, now: float) -> Refused | None:
        if self.hellos.allow(address.encode(), now):
            return None
        return Refused("rate_limited", f"more than {HELLO_BURST} hellos from {address} at once")

    def forget_idle(self, now: float) -> None:
        self.limiter.forget_idle(now)
        self.hellos.forget_idle(now)

    def refusal(self, identity: bytes, size: int, may_submit: bool, now: float) -> Refused | None:
        """Why to refuse the message unread, or None to read it.

        may_submit: the sender is a worker in good standing that holds an open lease.
        """
        if not self.limiter.allow(identity, now):
            limiter = self.limiter
            return Refused(
                "rate_limited",
                f"more than {limiter.rate:g} messages per second (bursts of {limiter.burst})",
            )
        if size <= SMALL_MESSAGE_BYTES:
            return None
        if size > self.max_message_bytes:
            return Refused(
                "too_large",
                f"{size} bytes; a submission under this run's settings takes at most "
                f"{self.max_message_bytes}",
            )
        if not may_submit:
            return Refused(
                "too_large",
                f"{size} bytes from a worker without an open lease: only a submission may "
                f"exceed {SMALL_MESSAGE_BYTES} bytes",
            )
        return None


def largest_submission_bytes(config: Config, tokenizer: Any) -> int:
    """The most bytes an honest submission can take on the wire under this run's settings."""
    longest_token = max(
        len(token) for token in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))
    )
    per_token = _TOKEN_BYTES + 4 * longest_token  # a character takes up to 4 bytes in UTF-8
    per_completion = _COMPLETION_BYTES + config.sampling.max_completion_length * per_token
    per_group = _GROUP_BYTES + config.sampling.num_generations * per_completion
    return _MESSAGE_BYTES + config.swarm.prompts_per_lease * per_group
