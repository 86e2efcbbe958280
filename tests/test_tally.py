"""A worker's own console: each verdict with what the worker has contributed so far."""

from __future__ import annotations

import logging

import pytest

from swarmrl.protocol import messages as m
from swarmrl.rollout.tally import Tally
from tests.test_worker import SlowEngine, worker_with


def test_the_tally_counts_accepted_and_rejected_completions_by_reason() -> None:
    tally = Tally()
    tally.record(m.Accept(lease_id="L1"), 8, 120, 2.0)
    tally.record(m.Reject(lease_id="L2", reason="stale_version"), 8, 100, 2.0)
    tally.record(m.Accept(lease_id="L3"), 8, 90, 1.0)
    tally.record(m.Reject(lease_id="L4", reason="text_mismatch"), 4, 40, 1.0)
    assert (tally.accepted, tally.rejected) == (16, 12)
    assert tally.summary() == (
        "so far 16 accepted, 12 rejected (stale_version 8, text_mismatch 4): "
        "57% of what this worker sent"
    )


def test_verdicts_reach_the_console_with_the_running_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker, _ = worker_with(SlowEngine(0.0))
    worker.submitted = {"L1": (8, 64, 2.0), "L2": (8, 64, 2.0)}
    with caplog.at_level(logging.INFO, logger="worker"):
        worker._dispatch(m.Accept(lease_id="L1"), [])
        worker._dispatch(m.Reject(lease_id="L2", reason="stale_version", detail="2 behind"), [])
    accepted, rejected = (record.getMessage() for record in caplog.records)
    assert accepted == (
        "lease L1: 8 completions, 64 tokens in 2.0s (32 tok/s), accepted; "
        "so far 8 accepted, 0 rejected: 100% of what this worker sent"
    )
    assert rejected == (
        "lease L2 rejected: stale_version (2 behind); so far 8 accepted, 8 rejected "
        "(stale_version 8): 50% of what this worker sent"
    )
    assert worker.submitted == {}
    worker._close("test")
