"""Tests for swarmrl.trainer.leases: issuing, closing, expiring and re-issuing prompt leases.

Seeds are (seed * 1_000_003 + index * 7_919 + attempt) mod (2**31 - 1); with seed 0 the seed of
prompt i on its first issue is 7919 * i, and a re-issued prompt adds its attempt count.
"""

import json

import pytest

from swarmrl.protocol.refusals import Refused
from swarmrl.trainer.leases import LeaseBook, WaitingWorkers, prompt_id


def book(seed: int = 0, timeout: float = 10.0) -> LeaseBook:
    return LeaseBook(seed=seed, lease_timeout_s=timeout, id_prefix="L")


def test_prompt_id() -> None:
    assert prompt_id(0) == "p0"
    assert prompt_id(42) == "p42"


def test_fresh_leases_take_consecutive_indices() -> None:
    leases = book()
    first = leases.issue("w1", 3, policy_version=4, now=100.0)
    assert first.lease_id == "L1"
    assert first.worker_id == "w1"
    assert first.prompt_indices == [0, 1, 2]
    assert first.seeds == [0, 7919, 15838]
    assert first.policy_version == 4
    assert first.deadline == 110.0
    second = leases.issue("w2", 2, policy_version=5, now=101.0)
    assert second.lease_id == "L2"
    assert second.prompt_indices == [3, 4]
    assert second.seeds == [23757, 31676]
    assert second.deadline == 111.0
    assert leases.next_index == 5
    assert leases.outstanding == 5


def test_seeds_depend_on_the_run_seed() -> None:
    # 5 * 1_000_003 = 5_000_015; index 2 adds 15_838
    assert book(seed=5).issue("w", 3, 0, 0.0).seeds == [5_000_015, 5_007_934, 5_015_853]
    # 3000 * 1_000_003 = 3_000_009_000 = 2_147_483_647 + 852_525_353
    assert book(seed=3000).issue("w", 1, 0, 0.0).seeds == [852_525_353]


def test_close_returns_the_lease_and_frees_it() -> None:
    leases = book()
    lease = leases.issue("w1", 2, 0, now=0.0)
    assert leases.close(lease.lease_id, "w1", now=10.0) is lease  # deadline itself is in time
    assert leases.open == {}
    assert leases.outstanding == 0
    with pytest.raises(Refused) as caught:
        leases.close(lease.lease_id, "w1", now=10.0)
    assert caught.value.reason == "unknown_lease"


def test_close_unknown_lease() -> None:
    with pytest.raises(Refused) as caught:
        book().close("L9", "w1", now=0.0)
    assert caught.value.reason == "unknown_lease"
    assert str(caught.value).startswith("unknown_lease: lease L9")


def test_close_by_another_worker_keeps_the_lease_open() -> None:
    leases = book()
    lease = leases.issue("w1", 2, 0, now=0.0)
    with pytest.raises(Refused) as caught:
        leases.close(lease.lease_id, "w2", now=1.0)
    assert caught.value.reason == "not_your_lease"
    assert list(leases.open) == ["L1"]
    assert leases.close("L1", "w1", now=2.0) is lease


def test_close_after_deadline_expires_and_requeues() -> None:
    leases = book()
    leases.issue("w1", 2, 0, now=0.0)
    with pytest.raises(Refused) as caught:
        leases.close("L1", "w1", now=10.5)
    assert caught.value.reason == "lease_expired"
    assert leases.open == {}
    assert list(leases.requeued) == [0, 1]
    with pytest.raises(Refused) as caught:
        leases.close("L1", "w1", now=10.5)
    assert caught.value.reason == "unknown_lease"


def test_requeued_prompt_is_issued_first_with_a_new_seed() -> None:
    leases = book()
    first = leases.issue("w1", 2, 0, now=0.0)
    assert first.seeds == [0, 7919]
    leases.close("L1", "w1", now=1.0)
    leases.requeue([1])  # e.g. a rejected submission
    again = leases.issue("w2", 2, 0, now=2.0)
    assert again.prompt_indices == [1, 2]
    assert again.seeds == [7920, 15838]  # attempt 1 for prompt 1; prompt 2 is fresh
    leases.close(again.lease_id, "w2", now=3.0)
    leases.requeue([1])
    assert leases.issue("w1", 1, 0, now=4.0).seeds == [7921]  # attempt 2
    assert leases.attempts == {1: 2}


def test_requeue_keeps_order_and_goes_before_earlier_requeues() -> None:
    leases = book()
    leases.issue("w1", 6, 0, now=0.0)
    leases.close("L1", "w1", now=0.0)
    leases.requeue([4, 5])
    leases.requeue([1, 2])
    assert leases.issue("w1", 5, 0, now=1.0).prompt_indices == [1, 2, 4, 5, 6]


def test_expire_due_only_takes_leases_past_their_deadline() -> None:
    leases = book()
    early = leases.issue("w1", 2, 0, now=0.0)  # deadline 10
    late = leases.issue("w2", 1, 0, now=5.0)  # deadline 15
    assert leases.expire_due(now=10.0) == []
    assert leases.expire_due(now=12.0) == [early]
    assert list(leases.open) == [late.lease_id]
    assert leases.outstanding == 1
    reissued = leases.issue("w3", 3, 1, now=12.0)
    assert reissued.prompt_indices == [0, 1, 3]
    assert reissued.seeds == [1, 7920, 23757]


def test_expire_worker_takes_only_that_workers_leases() -> None:
    leases = book()
    leases.issue("w1", 2, 0, now=0.0)  # 0, 1
    leases.issue("w2", 1, 0, now=0.0)  # 2
    gone = leases.expire_worker("w1")
    assert [lease.lease_id for lease in gone] == ["L1"]
    assert list(leases.open) == ["L2"]
    assert leases.issue("w2", 3, 0, now=1.0).prompt_indices == [0, 1, 3]
    assert leases.expire_worker("nobody") == []


def test_several_expired_leases_come_back_in_prompt_order() -> None:
    leases = book()
    leases.issue("w1", 2, 0, now=0.0)  # 0, 1
    leases.issue("w2", 2, 0, now=0.0)  # 2, 3
    assert len(leases.expire_due(now=11.0)) == 2
    assert leases.issue("w3", 5, 0, now=11.0).prompt_indices == [0, 1, 2, 3, 4]


def test_worker_leases_come_back_in_prompt_order() -> None:
    leases = book()
    leases.issue("w1", 2, 0, now=0.0)  # 0, 1
    leases.issue("w1", 2, 0, now=0.0)  # 2, 3
    leases.expire_worker("w1")
    assert leases.issue("w2", 4, 0, now=1.0).prompt_indices == [0, 1, 2, 3]


def test_state_restore_round_trip_owes_open_lease_prompts() -> None:
    leases = book(seed=0)
    leases.issue("w1", 2, 0, now=0.0)  # L1: 0, 1 stays open
    leases.issue("w2", 2, 0, now=0.0)  # L2: 2, 3
    leases.close("L2", "w2", now=1.0)
    leases.requeue([3])  # rejected: owed, attempt 1
    state = json.loads(json.dumps(leases.state()))  # what a checkpoint stores
    # open prompts 0 and 1 are owed and will be re-issued, so they count one more attempt
    assert state == {
        "next_index": 4,
        "requeued": [0, 1, 3],
        "attempts": {"3": 1, "0": 1, "1": 1},
    }
    assert leases.attempts == {3: 1}  # taking the state does not change the live book
    assert list(leases.open) == ["L1"]

    restored = book(seed=0)
    restored.restore(state)
    assert restored.open == {}
    assert restored.outstanding == 0
    lease = restored.issue("w9", 5, 2, now=50.0)
    assert lease.prompt_indices == [0, 1, 3, 4, 5]
    # attempt 1 for 0, 1 and 3 (new seeds, not their first-issue seeds 0 and 7919); 4, 5 fresh
    assert lease.seeds == [1, 7920, 23758, 31676, 39595]


def test_restore_clears_open_leases() -> None:
    leases = book()
    leases.issue("w1", 2, 0, now=0.0)
    leases.restore({"next_index": 7, "requeued": [], "attempts": {}})
    assert leases.open == {}
    assert leases.issue("w1", 1, 0, now=0.0).prompt_indices == [7]


def test_outstanding_counts_open_leases_only() -> None:
    leases = book()
    assert leases.outstanding == 0
    leases.issue("w1", 3, 0, now=0.0)
    leases.issue("w2", 2, 0, now=0.0)
    assert leases.outstanding == 5
    leases.close("L1", "w1", now=1.0)
    assert leases.outstanding == 2
    leases.expire_worker("w2")
    assert leases.outstanding == 0


def test_held_counts_each_workers_open_leases() -> None:
    leases = book(seed=0)
    first = leases.issue("w1", 1, 0, now=0.0)
    leases.issue("w1", 2, 0, now=1.0)
    leases.issue("w2", 1, 0, now=2.0)
    assert (leases.held("w1"), leases.held("w2"), leases.held("w3")) == (2, 1, 0)
    leases.close(first.lease_id, "w1", now=3.0)
    assert leases.held("w1") == 1
    assert [lease.worker_id for lease in leases.expire_worker("w1")] == ["w1"]
    assert (leases.held("w1"), leases.outstanding) == (0, 1)
    assert leases.by_worker == {"w2": {"L3": leases.open["L3"]}}


def test_waiting_workers_forget_a_refusal_after_the_window() -> None:
    waiting = WaitingWorkers(window_s=2.0)
    assert not waiting.others("a", now=0.0)
    waiting.refused("idle", now=1.0)
    assert waiting.others("busy", now=2.0) and not waiting.others("idle", now=2.0)
    waiting.refused("other", now=2.5)
    assert waiting.others("idle", now=2.5)  # "other" waits too
    assert not waiting.others("other", now=3.5)  # idle's refusal is 2.5 s old: forgotten
    waiting.discard("other")
    assert not waiting.others("busy", now=3.6)
