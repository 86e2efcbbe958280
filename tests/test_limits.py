"""Tests for swarmrl.trainer.limits: the per-connection token bucket and the size gate."""

from __future__ import annotations

import pytest

from swarmrl.base.config import Config
from swarmrl.protocol import messages as m
from swarmrl.protocol.framing import encode
from swarmrl.trainer.limits import (
    SMALL_MESSAGE_BYTES,
    Gate,
    RateLimiter,
    TokenBucket,
    largest_submission_bytes,
)


def test_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)  # 0.8 of a token back
    assert bucket.take(0.5)
    assert not bucket.full(1.0)
    assert bucket.full(2.0)  # refilled, never beyond the burst
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]


def test_limiter_keeps_one_bucket_per_connection_and_forgets_refilled_ones() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    assert [limiter.allow(b"flood", 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow(b"other", 0.0)  # another connection is not slowed down
    limiter.forget_idle(1.5)  # "other" has refilled, "flood" has not
    assert set(limiter.buckets) == {b"flood"}
    assert [limiter.allow(b"flood", 1.5) for _ in range(2)] == [True, False]


@pytest.fixture(scope="module")
def tokenizer(model_path: str) -> object:
    from swarmrl.base.models import load_tokenizer

    return load_tokenizer(model_path)


def test_the_largest_honest_submission_fits_the_bound(tokenizer: object) -> None:
    config = Config(
        sampling={"num_generations": 4, "max_completion_length": 16}, swarm={"prompts_per_lease": 3}
    )
    vocabulary = tokenizer.convert_ids_to_tokens(range(len(tokenizer)))
    longest = max(range(len(vocabulary)), key=lambda i: len(vocabulary[i]))
    ids = [longest] * 16
    completion = m.Completion(
        token_ids=ids, logprobs=[-1e-30] * 16, text=tokenizer.decode(ids), finish_reason="length"
    )
    worst = m.Submission(
        lease_id="L" * m.MAX_ID_CHARS,
        policy_version=2**40,
        generation_seconds=1e300,
        groups=[m.GroupResult(prompt_id="p" * m.MAX_ID_CHARS, completions=[completion] * 4)] * 3,
    )
    size = len(encode(worst)[0])
    bound = largest_submission_bytes(config, tokenizer)
    assert size <= bound < 4 * size


def test_gate_refuses_by_rate_then_size_before_anything_is_decoded(tokenizer: object) -> None:
    config = Config(swarm={"rate_limit_per_s": 1.0, "rate_limit_burst": 3})
    gate = Gate(config, tokenizer)
    big, huge = SMALL_MESSAGE_BYTES + 1, gate.max_message_bytes + 1
    assert gate.refusal(b"a", 100, may_submit=False, now=0.0) is None
    assert gate.refusal(b"a", big, may_submit=True, now=0.0) is None
    refused = gate.refusal(b"a", big, may_submit=False, now=0.0)
    assert refused.reason == "too_large" and "without an open lease" in refused.detail
    refused = gate.refusal(b"b", huge, may_submit=True, now=0.0)
    assert refused.reason == "too_large" and str(gate.max_message_bytes) in refused.detail
    refused = gate.refusal(b"a", 100, may_submit=True, now=0.0)
    assert refused.reason == "rate_limited" and "more than 1 messages per second" in refused.detail
