"""The core split between the trainer and `swarmrl run`'s local workers (trainer/cores.py): when
it takes every core, what it waits for, and that pausing reaches only the local workers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq

from swarmrl.protocol import messages as m
from swarmrl.trainer.cores import CoreSplit, takes_the_cores
from swarmrl.trainer.leases import LeaseBook
from swarmrl.trainer.server import SwarmServer
from tests.peers import Peer

LOCAL = frozenset({"worker-1", "worker-2"})


class FakeServer:
    """SwarmServer.pause_leasing's contract: `buffered` groups, and the local workers' held
    leases coming back one per poll."""

    def __init__(self, buffered: int, held: int) -> None:
        self.buffered, self.held = buffered, held
        self.paused: list[frozenset[str]] = []

    def pause_leasing(self, workers: frozenset[str]) -> tuple[int, int]:
        self.paused.append(workers)
        answer = (self.buffered, self.held)
        self.held = max(0, self.held - 1)
        return answer


def split(server: FakeServer, threads: list[int], wait_s: float = 5.0) -> CoreSplit:
    return CoreSplit(
        server.pause_leasing,
        threads.append,
        LOCAL,
        prompts_per_step=4,
        all_threads=2,
        shared_threads=1,
        wait_s=wait_s,
    )


def test_the_cores_go_to_training_only_when_the_next_step_is_buffered() -> None:
    assert not takes_the_cores(buffered_groups=3, prompts_per_step=4)
    assert takes_the_cores(buffered_groups=4, prompts_per_step=4)
    assert takes_the_cores(buffered_groups=7, prompts_per_step=4)


def test_while_generation_is_behind_the_workers_keep_generating() -> None:
    server, threads = FakeServer(buffered=3, held=2), []
    with split(server, threads).for_step() as used:
        assert used == 1
        assert server.paused[-1] == frozenset()  # leasing again at once
    assert threads == [] and server.paused[-1] == frozenset()


def test_training_waits_for_the_local_leases_then_takes_every_core() -> None:
    server, threads = FakeServer(buffered=4, held=2), []
    with split(server, threads).for_step() as used:
        assert used == 2 and threads == [2]
        assert server.held == 0 and server.paused[-1] == LOCAL  # paused while it trains
    assert threads == [2, 1] and server.paused[-1] == frozenset()


def test_a_lease_still_out_after_the_wait_keeps_the_split() -> None:
    server, threads = FakeServer(buffered=4, held=10**6), []
    with split(server, threads, wait_s=0.2).for_step() as used:
        assert used == 1 and server.paused[-1] == frozenset()
    assert threads == []


def test_a_paused_worker_is_leased_nothing_and_the_others_go_on() -> None:
    leases = LeaseBook(seed=0, lease_timeout_s=10.0, id_prefix="L")
    leases.paused = frozenset({"worker-1"})
    assert leases.offer("worker-1", 2, 0, buffered=0, now=0.0).reason.startswith("the trainer")
    assert leases.offer("remote", 2, 0, buffered=0, now=0.0).prompt_indices == [0, 1]
    leases.paused = frozenset()
    assert leases.offer("worker-1", 2, 0, buffered=0, now=0.0).prompt_indices == [2, 3]


def test_the_server_pauses_only_the_named_workers(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    server = swarm()
    local, remote = Peer(context, server.endpoint), Peer(context, server.endpoint)
    local.hello("worker-1")
    remote.hello("remote")
    assert server.pause_leasing(frozenset({"worker-1"})) == (0, 0)  # nothing buffered or out
    refused = local.ask()
    assert isinstance(refused, m.NoWork) and "training" in refused.reason, refused
    remote.lease()
    assert server.pause_leasing(frozenset({"remote"})) == (0, 1)  # the lease it holds
    server.pause_leasing(frozenset())  # nobody paused
    local.lease()
