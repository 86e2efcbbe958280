"""Tests for swarmrl.trainer.buffer: the queue of scored groups between network and optimizer."""

import threading
import time

from swarmrl.trainer.buffer import GroupBuffer, ScoredGroup


def group(index: int, version: int, rewards: tuple[float, ...] = (0.0, 1.0)) -> ScoredGroup:
    return ScoredGroup(
        prompt_index=index,
        prompt_token_ids=[1, 2],
        completion_token_ids=[[3] for _ in rewards],
        behavior_logprobs=[[-0.5] for _ in rewards],
        rewards=list(rewards),
        worker_id="w1",
        policy_version=version,
    )


def indices(groups: list[ScoredGroup] | None) -> list[int] | None:
    return None if groups is None else [g.prompt_index for g in groups]


def test_has_signal() -> None:
    assert group(0, 0, (0.0, 1.0)).has_signal()
    assert group(0, 0, (0.5, 0.5, 0.25)).has_signal()
    assert not group(0, 0, (1.0, 1.0, 1.0)).has_signal()
    assert not group(0, 0, (0.0, 0.0)).has_signal()


def test_take_returns_none_on_timeout_and_keeps_groups() -> None:
    buffer = GroupBuffer()
    buffer.put(group(0, 0))
    start = time.monotonic()
    batch, stale = buffer.take(2, current_version=0, max_staleness=1, timeout_s=0.05)
    elapsed = time.monotonic() - start
    assert batch is None
    assert stale == []
    assert 0.04 <= elapsed < 1.0
    assert len(buffer) == 1  # the waiting group is still there for the next take


def test_take_preserves_order_and_leaves_the_rest() -> None:
    buffer = GroupBuffer()
    for index in (5, 3, 8, 1):
        buffer.put(group(index, 0))
    batch, stale = buffer.take(3, current_version=0, max_staleness=0, timeout_s=0.0)
    assert indices(batch) == [5, 3, 8]
    assert stale == []
    assert indices(buffer.peek()) == [1]
    assert len(buffer) == 1


def test_stale_groups_are_handed_back_never_batched() -> None:
    buffer = GroupBuffer()
    # current version 5, max_staleness 1: lag 5-3=2 and 5-2=3 are stale; lags 0 and 1 are fresh
    buffer.put(group(0, 3))
    buffer.put(group(1, 4))
    buffer.put(group(2, 2))
    buffer.put(group(3, 5))
    buffer.put(group(4, 4))
    batch, stale = buffer.take(2, current_version=5, max_staleness=1, timeout_s=0.0)
    assert indices(batch) == [1, 3]
    assert indices(stale) == [0, 2]
    assert indices(buffer.peek()) == [4]


def test_stale_groups_are_returned_even_on_timeout() -> None:
    buffer = GroupBuffer()
    buffer.put(group(0, 0))
    buffer.put(group(1, 3))
    batch, stale = buffer.take(2, current_version=3, max_staleness=2, timeout_s=0.01)
    # lag of group 0 is 3 > 2: stale; group 1 alone is not a batch of 2
    assert batch is None
    assert indices(stale) == [0]
    assert indices(buffer.peek()) == [1]


def test_staleness_boundary_is_inclusive() -> None:
    buffer = GroupBuffer()
    buffer.put(group(0, 8))  # lag exactly max_staleness (2): still usable
    batch, stale = buffer.take(1, current_version=10, max_staleness=2, timeout_s=0.0)
    assert indices(batch) == [0]
    assert stale == []


def test_take_wakes_when_another_thread_puts() -> None:
    buffer = GroupBuffer()
    buffer.put(group(0, 0))
    result: list = []

    def waiter() -> None:
        result.append(buffer.take(2, current_version=0, max_staleness=0, timeout_s=5.0))

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.02)
    buffer.put(group(1, 0))
    thread.join(timeout=2.0)
    assert not thread.is_alive()
    batch, stale = result[0]
    assert indices(batch) == [0, 1]
    assert stale == []


def test_close_wakes_a_waiting_take() -> None:
    buffer = GroupBuffer()
    result: list = []

    def waiter() -> None:
        start = time.monotonic()
        result.append(buffer.take(1, current_version=0, max_staleness=0, timeout_s=30.0))
        result.append(time.monotonic() - start)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.02)
    buffer.close()
    thread.join(timeout=2.0)
    assert not thread.is_alive()
    assert result[0] == (None, [])
    assert result[1] < 2.0


def test_take_after_close_returns_at_once() -> None:
    buffer = GroupBuffer()
    buffer.put(group(0, 0))
    buffer.close()
    start = time.monotonic()
    assert buffer.take(2, current_version=0, max_staleness=0, timeout_s=30.0) == (None, [])
    assert time.monotonic() - start < 1.0
    # enough groups are still handed out after close
    batch, _ = buffer.take(1, current_version=0, max_staleness=0, timeout_s=30.0)
    assert indices(batch) == [0]


def test_timeout_is_a_total_deadline_not_per_wakeup() -> None:
    buffer = GroupBuffer()
    stop = threading.Event()

    def trickle() -> None:  # a stale group every 10 ms for 0.5 s
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and not stop.is_set():
            buffer.put(group(0, 0))
            time.sleep(0.01)

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        start = time.monotonic()
        batch, stale = buffer.take(1, current_version=5, max_staleness=1, timeout_s=0.1)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        thread.join()
    assert batch is None
    assert stale
    assert elapsed < 0.3
