"""The progress bar's total and time left follow `max_minutes` when the time budget ends the run."""

from __future__ import annotations

import pytest

from swarmrl.trainer import progress
from swarmrl.trainer.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    return clock


def worker(samples: int) -> dict:
    return {"samples": samples, "connected": True, "rejected": 0, "quarantined": False}


def test_a_time_budget_that_ends_the_run_first_sets_total_and_time_left(clock: Clock) -> None:
    bar = Progress(max_steps=40, first_step=0, max_minutes=10)
    clock.now += 120  # 4 steps in 2 minutes: 30 s a step, 8 minutes left
    bar.update(4, 0.5, {"w": worker(40)})
    assert bar.estimate(4, clock.now) == (20, 480.0, True)
    assert bar.bar.total == 20 and bar.bar.n == 4
    assert "left 08:00 (time budget)" in bar.bar.postfix
    bar.close()


def test_steps_that_fit_in_the_budget_keep_max_steps(clock: Clock) -> None:
    bar = Progress(max_steps=10, first_step=0, max_minutes=10)
    clock.now += 60  # 12 s a step: step 10 comes a minute later, well within the budget
    assert bar.estimate(5, clock.now) == (10, 60.0, False)
    bar.close()


def test_a_step_started_before_the_deadline_counts(clock: Clock) -> None:
    bar = Progress(max_steps=40, first_step=0, max_minutes=1)
    clock.now += 40  # 20 s a step, 20 s left: one more step starts in time
    assert bar.estimate(2, clock.now)[0] == 3
    bar.close()


def test_without_a_budget_or_a_step_yet(clock: Clock) -> None:
    bare = Progress(max_steps=30, first_step=10)
    assert bare.estimate(10, clock.now) == (30, None, False)
    clock.now += 50
    assert bare.estimate(15, clock.now) == (30, 150.0, False)  # resumed at 10: 10 s a step
    budget = Progress(max_steps=30, first_step=0, max_minutes=5)
    assert budget.estimate(0, clock.now) == (30, 300.0, True)  # at most the budget
    for bar in (bare, budget):
        bar.close()
