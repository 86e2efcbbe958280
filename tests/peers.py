"""Raw peers for driving a real SwarmServer over real ZeroMQ.

A `Peer` is one DEALER connection that sends exactly what a test tells it to (an honest
worker's messages, or an attacker's). The `swarm` fixture (conftest.py) starts the real server
with the real tokenizer, tasks and reward functions but no model, so such tests are quick.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import zmq

from swarmrl.protocol import messages as m
from swarmrl.protocol.transport import Channel, make_dealer
from swarmrl.trainer.publish import Published
from swarmrl.trainer.server import SwarmServer


class Peer:
    """One connection to the trainer that sends exactly what the test tells it to."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        identity = b"A" + uuid.uuid4().bytes  # must not start with a zero byte
        self.channel = Channel(make_dealer(context, endpoint, identity, 2**26))
        self.version = 0

    def send(self, message: Any) -> None:
        self.channel.send(message, timeout_s=5.0)

    def send_frames(self, frames: list[bytes]) -> None:
        self.channel.socket.send_multipart(frames)

    def receive(self, timeout_s: float = 5.0) -> Any:
        """The next message that is not a heartbeat; None after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            received = self.channel.recv(left)
            if received is not None and not isinstance(received[0], m.Heartbeat):
                return received[0]
        return None

    def hello(self, name: str) -> m.RunSpec:
        self.send(
            m.Hello(
                worker_name=name, backend="hf", software_version="test", max_prompts_per_lease=1
            )
        )
        spec = self.receive()
        assert isinstance(spec, m.RunSpec), spec
        self.version = spec.weights_version
        return spec

    def ask(self) -> Any:
        """Ask for work, claiming to hold the trainer's current weights; the answer."""
        self.send(m.WorkRequest(max_prompts=1, weights_version=self.version))
        return self.receive()

    def lease(self) -> m.Lease:
        answer = self.ask()
        assert isinstance(answer, m.Lease), answer
        return answer

    def submit(self, submission: m.Submission) -> Any:
        self.send(submission)
        return self.receive()


def completion(tokenizer: Any, text: str, logprob: float = -1.0) -> m.Completion:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return m.Completion(
        token_ids=ids,
        logprobs=[logprob] * len(ids),
        text=tokenizer.decode(ids, skip_special_tokens=True),
        finish_reason="stop",
    )


def submission(
    lease: m.Lease, completions: list[m.Completion], version: int | None = None, **extra: Any
) -> m.Submission:
    return m.Submission(
        lease_id=lease.lease_id,
        policy_version=lease.policy_version if version is None else version,
        groups=[
            m.GroupResult(prompt_id=p.prompt_id, completions=completions) for p in lease.prompts
        ],
        generation_seconds=0.1,
        **extra,
    )


def answer_of(lease: m.Lease, tasks: Any) -> str:
    return tasks.train(int(lease.prompts[0].prompt_id[1:])).answer


def spread(tokenizer: Any, lease: m.Lease, tasks: Any) -> list[m.Completion]:
    """A right and a wrong answer: a group with a reward spread, as honest work mostly is."""
    gold = answer_of(lease, tasks)
    return [completion(tokenizer, gold), completion(tokenizer, gold + "1")]


def prove(server: SwarmServer, *names: str) -> None:
    """Mark workers as proven honest (as screening does after their first checked groups)."""
    for name in names:
        server.ledger.records[name].proven = True


def publish(server: SwarmServer, version: int) -> None:
    server.weights.publish(Published(version=version, fingerprint=f"v{version}", keyframe=b""))
