"""When rewards saturate, most groups have no reward spread: the trainer must not starve waiting
for a full step of groups that have one (verl's max_num_gen_batches cap)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq

from swarmrl.protocol import messages as m
from swarmrl.trainer.buffer import GroupBuffer, ScoredGroup
from swarmrl.trainer.progress import waiting_for
from swarmrl.trainer.server import SwarmServer
from tests.peers import Peer, answer_of, completion, prove, submission


def group(index: int) -> ScoredGroup:
    return ScoredGroup(index, [1], [[2], [3]], [[-1.0], [-1.0]], [1.0, 0.0], "w", 0)


def test_a_buffer_settles_for_fewer_groups_only_when_asked() -> None:
    buffer = GroupBuffer()
    buffer.put(group(0))
    assert buffer.take(4, 0, 2, timeout_s=0.01)[0] is None  # a full step's worth is wanted
    batch, _ = buffer.take(4, 0, 2, timeout_s=0.01, minimum=1)
    assert [g.prompt_index for g in batch] == [0]


def test_after_enough_groups_without_spread_a_step_takes_what_there_is(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    server = swarm(prompts_per_lease=1)  # prompts_per_step 2; max_num_gen_batches 4 -> 8
    worker = Peer(context, server.endpoint)
    worker.hello("saturated")
    prove(server, "saturated")
    lease = worker.lease()
    gold = answer_of(lease, server.intake.tasks)
    spread = [completion(tokenizer, gold), completion(tokenizer, "0")]
    assert isinstance(worker.submit(submission(lease, spread)), m.Accept)  # one with a spread
    assert server.next_batch(timeout_s=0.1) is None and not server.starved
    for _ in range(7):  # then only groups that are all right: no spread
        lease = worker.lease()
        right = [completion(tokenizer, answer_of(lease, server.intake.tasks))] * 2
        assert isinstance(worker.submit(submission(lease, right)), m.Accept)
    assert server.starved  # 8 groups scored since the last step
    assert server.spread_counts() == (8, 7)  # the step's zero_spread_fraction: 7/8
    assert waiting_for(*server.spread_counts()).startswith("waiting for reward spread: 7 of 8")
    batch = server.next_batch(timeout_s=0.1)
    assert batch is not None and len(batch) == 1
    server.take_rewards()  # a step was taken: the count starts again
    assert not server.starved and server.spread_counts() == (0, 0)


def test_the_wait_is_for_workers_until_most_groups_lack_a_spread() -> None:
    assert waiting_for(0, 0) == "waiting for workers"
    assert waiting_for(4, 2) == "waiting for workers"
    assert waiting_for(5, 3) == "waiting for reward spread: 3 of 5 groups had none"
