"""Attacks on multi-turn episodes against the real trainer over real ZeroMQ: a forged tool
result, text injected between turns, an extra turn, too many turns and an episode cut short
are each refused for their reason and counted against the forger, while an honest worker's
episodes keep being accepted and scored on the conversation the trainer rebuilt.

The server is the real SwarmServer with the `tools` environment (the `add` tool) on the
arithmetic task; peers are raw DEALER sockets (tests.peers) that build their episodes with the
worker's own episode loop, then tamper with them as the tool benchmark's forgers do
(benchmarks/tool_recipe.ATTACKS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq

from benchmarks.tool_recipe import ATTACKS, honest_pair
from swarmrl.protocol import messages as m
from swarmrl.trainer.server import SwarmServer
from tests.peers import Peer, submission

TOOLS = {"name": "tools", "tools": ["add"], "max_turns": 2}


def test_forged_episodes_are_refused_for_their_reason_and_honest_ones_train(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    server = swarm(environment=TOOLS, quarantine_rejections=10)
    honest, forger = Peer(context, server.endpoint), Peer(context, server.endpoint)
    spec = honest.hello("honest")
    assert spec.environment is not None and spec.environment.tools == ["add"]
    forger.hello("forger")

    def group(lease: m.Lease) -> list[m.Completion]:
        return list(honest_pair(tokenizer, spec.environment, lease.prompts[0], "add"))

    lease = honest.lease()
    sent = group(lease)
    assert isinstance(honest.submit(submission(lease, sent)), m.Accept)
    (scored,) = server.buffer.peek()
    assert scored.rewards == [1.0, 0.0]  # the trainer scored the conversations it rebuilt
    assert scored.turn_lengths == [c.turn_lengths for c in sent]

    reasons = {}
    for attack, (_, tamper) in ATTACKS.items():
        lease = forger.lease()
        right, guess = group(lease)
        reply = forger.submit(submission(lease, [tamper(tokenizer, right, guess), guess]))
        assert isinstance(reply, m.Reject), (attack, reply)
        reasons[attack] = reply.reason
    assert reasons == {attack: reason for attack, (reason, _) in ATTACKS.items()}
    table = server.worker_table()
    assert table["forger"]["reasons"] == {reason: 1 for reason in reasons.values()}
    assert table["forger"]["samples"] == 0

    # The honest worker goes on as before.
    lease = honest.lease()
    assert isinstance(honest.submit(submission(lease, group(lease))), m.Accept)
    assert server.worker_table()["honest"]["samples"] == 4
    assert server.worker_table()["honest"]["reasons"] == {}
