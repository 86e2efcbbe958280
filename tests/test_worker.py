"""The rollout worker's own rules, with the network and the engine stubbed out: what it sends."""

from __future__ import annotations

import time
from typing import Any

import pytest

from swarmrl.base.generation import Sample
from swarmrl.protocol import messages as m
from swarmrl.rollout.worker import Worker, WorkerOptions


class Recorder:
    """A Channel that keeps what the worker sends and never receives anything."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, message: Any, timeout_s: float = 0.0) -> None:
        self.sent.append(message)

    def recv(self, timeout_s: float) -> None:
        time.sleep(min(timeout_s, 0.01))

    def close(self, linger_s: float = 0.0) -> None:
        pass


class SlowEngine:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def generate(self, prompts: list, n: int, sampling: Any, seeds: list) -> list[list[Sample]]:
        time.sleep(self.seconds)
        return [[Sample([5, 6], [-0.5, -0.5], "stop", "56")] * n for _ in prompts]


def worker_with(engine: SlowEngine) -> tuple[Worker, Recorder]:
    worker = Worker(WorkerOptions(connect="tcp://127.0.0.1:1", max_leases=10))
    channel = Recorder()
    worker.channel, worker.backend = channel, engine  # type: ignore[assignment]
    worker.spec = m.RunSpec(
        run_id="r",
        worker_id="w",
        model="m",
        dtype="float32",
        sampling=m.SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=4),
        num_generations=2,
        heartbeat_interval_s=60.0,
        heartbeat_timeout_s=60.0,
        weights_version=0,
    )
    worker.next_beat = time.monotonic() + 60
    worker.version = 0
    return worker, channel


def lease(deadline_s: float) -> m.Lease:
    prompt = m.LeasePrompt(prompt_id="p0", token_ids=[1, 2, 3], seed=7)
    return m.Lease(
        lease_id="L1", policy_version=0, num_generations=2, prompts=[prompt], deadline_s=deadline_s
    )


def test_a_lease_done_within_its_deadline_is_submitted() -> None:
    worker, channel = worker_with(SlowEngine(0.0))
    worker._dispatch(lease(deadline_s=30.0), [])
    worker._work_on(worker.inbox.popleft()[0])
    submissions = [s for s in channel.sent if isinstance(s, m.Submission)]
    assert [s.lease_id for s in submissions] == ["L1"]
    assert submissions[0].generation_seconds >= 0.0
    worker.submitted.clear()  # no verdict will come: don't wait for one
    worker._close("test")


def test_a_lease_past_its_deadline_is_dropped_not_submitted() -> None:
    worker, channel = worker_with(SlowEngine(0.3))
    worker._dispatch(lease(deadline_s=0.1), [])
    worker._work_on(worker.inbox.popleft()[0])
    assert not [s for s in channel.sent if isinstance(s, m.Submission)]
    assert worker.deadlines == {}
    worker._close("test")


def test_a_refused_work_request_is_an_answer_not_a_hang() -> None:
    worker, _ = worker_with(SlowEngine(0.0))
    worker.requested = True  # a pipelined request is out
    refused = m.Reject(lease_id=None, reason="too_many_leases", detail="1 leases open")
    worker._dispatch(refused, [])
    assert not worker.requested
    answer, _ = worker.inbox.popleft()
    assert isinstance(answer, m.NoWork) and answer.reason == "too_many_leases"
    worker._close("test")


def test_a_worker_without_the_runs_environment_says_which_package_it_needs() -> None:
    spec = m.EnvironmentSpec(
        name="tools",
        tools=["mytools_not_installed.calc:multiply"],
        max_turns=2,
        max_tool_output_chars=100,
        tool_timeout_s=5,
    )
    with pytest.raises(SystemExit, match="needs the package 'mytools_not_installed' installed"):
        Worker._make_environment(spec)
    assert Worker._make_environment(None) is None
    environment = Worker._make_environment(spec.model_copy(update={"tools": ["multiply"]}))
    assert environment is not None and list(environment.tools) == ["multiply"]
