"""Adversarial workers against the real trainer over real ZeroMQ: each attack is refused for the
right reason (the Reject's reason code), and honest workers keep working.

Most attacks run against a SwarmServer in this process (the real server, tokenizer, rewards
and sockets; no model, so they are quick); a peer here is a raw DEALER that sends whatever it
likes. The last test starts the real `swarmrl train` and an honest `swarmrl worker`, and a
forger in this process submits hand-written completions with made-up log-probs: the training
step must mask them out and the ledger must quarantine the forger while the honest worker
trains. docs/security.md ("Adversarial workers") tabulates these attacks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from benchmarks.attack_curve import forged_completions
from swarmrl.protocol import messages as m
from swarmrl.protocol.framing import encode
from swarmrl.trainer.logprob_check import LogprobMismatch
from swarmrl.trainer.publish import Delta, Published
from swarmrl.trainer.server import SwarmServer
from tests.conftest import start_trainer, start_worker, wait_for_text
from tests.peers import Peer, answer_of, completion, prove, publish, submission


def test_rewards_are_the_trainers_own_never_the_workers(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    server = swarm()
    liar = Peer(context, server.endpoint)
    liar.hello("liar")
    lease = liar.lease()
    wrong = [completion(tokenizer, "1"), completion(tokenizer, "2")]
    claimed = submission(lease, wrong)
    assert isinstance(liar.submit(claimed), m.Accept)
    assert server.take_rewards() == [0.0, 0.0]  # scored by the trainer: both wrong
    assert len(server.buffer) == 0  # no reward spread: nothing to train on
    lease = liar.lease()
    gold = answer_of(lease, server.intake.tasks)
    mixed = [completion(tokenizer, gold), completion(tokenizer, "0")]
    assert isinstance(liar.submit(submission(lease, mixed)), m.Accept)
    assert [g.rewards for g in server.buffer.peek()] == [[1.0, 0.0]]


def test_a_replayed_submission_is_a_duplicate(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    server = swarm()
    peer = Peer(context, server.endpoint)
    peer.hello("replayer")
    lease = peer.lease()
    sent = submission(lease, [completion(tokenizer, "12"), completion(tokenizer, "13")])
    assert isinstance(peer.submit(sent), m.Accept)
    again = peer.submit(sent)
    assert isinstance(again, m.Reject) and again.reason == "duplicate", again
    assert server.worker_table()["replayer"]["reasons"] == {"duplicate": 1}


def test_completions_copied_into_a_new_lease_are_duplicates(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    """The same prompt leased again (its group went stale): a copy is refused, a resample not."""
    server = swarm(max_open_leases=1)
    peer = Peer(context, server.endpoint)
    peer.hello("copier")
    lease = peer.lease()
    gold = answer_of(lease, server.intake.tasks)
    first = [completion(tokenizer, gold), completion(tokenizer, "0")]
    assert isinstance(peer.submit(submission(lease, first)), m.Accept)
    publish(server, 2)  # the buffered group is now 2 versions old, max_staleness 1
    assert server.next_batch(timeout_s=0.01) is None  # ... so its prompt is leased again
    peer.version = 2
    again = peer.lease()
    assert again.prompts[0].prompt_id == lease.prompts[0].prompt_id
    copied = peer.submit(submission(again, first))
    assert isinstance(copied, m.Reject) and copied.reason == "duplicate", copied
    again = peer.lease()  # refused prompts are leased again
    resampled = [completion(tokenizer, gold, logprob=-0.7), completion(tokenizer, "0", -0.7)]
    assert isinstance(peer.submit(submission(again, resampled)), m.Accept)


def test_stale_and_mismatched_versions_are_refused(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    server = swarm()
    peer = Peer(context, server.endpoint)
    peer.hello("laggard")
    answers = [completion(tokenizer, "1"), completion(tokenizer, "2")]
    lease = peer.lease()
    lying = peer.submit(submission(lease, answers, version=lease.policy_version + 1))
    assert isinstance(lying, m.Reject) and lying.reason == "version_mismatch", lying
    lease = peer.lease()
    publish(server, 1)
    publish(server, 2)  # leased at 0, trainer at 2, max_staleness 1
    stale = peer.submit(submission(lease, answers))
    assert isinstance(stale, m.Reject) and stale.reason == "stale_version", stale


def test_another_workers_lease_is_refused_and_stays_theirs(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    server = swarm()
    honest, thief = Peer(context, server.endpoint), Peer(context, server.endpoint)
    honest.hello("honest")
    thief.hello("thief")
    lease = honest.lease()
    answers = [completion(tokenizer, "1"), completion(tokenizer, "2")]
    stolen = thief.submit(submission(lease, answers))
    assert isinstance(stolen, m.Reject) and stolen.reason == "not_your_lease", stolen
    assert isinstance(honest.submit(submission(lease, answers)), m.Accept)


def test_oversized_messages_are_refused_before_they_are_decoded(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    server = swarm()
    honest, bulky = Peer(context, server.endpoint), Peer(context, server.endpoint)
    honest.hello("honest")
    bulky.hello("bulky")
    lease = bulky.lease()
    ids = [100] * 9000  # schema-valid, far more than max_completion_length allows
    huge = m.Completion(
        token_ids=ids, logprobs=[-1.0] * 9000, text=tokenizer.decode(ids), finish_reason="length"
    )
    refused = bulky.submit(submission(lease, [huge, huge]))
    assert isinstance(refused, m.Reject) and refused.reason == "too_large", refused
    assert str(server.gate.max_message_bytes) in refused.detail
    # Without an open lease, nothing over 64 KiB is even decoded.
    holder = Peer(context, server.endpoint)
    holder.hello("no-lease")
    holder.send_frames([b"\x81" * 70_000])
    refused = holder.receive()
    assert isinstance(refused, m.Reject) and refused.reason == "too_large", refused
    # From a connection that never said hello, anything bigger than a hello is ignored.
    stranger = Peer(context, server.endpoint)
    stranger.send_frames([b"\x81" * 5_000])
    assert stranger.receive(timeout_s=1.0) is None
    # Over ZeroMQ's MAXMSGSIZE (max_message_mb = 1) the connection is dropped unanswered.
    stranger.send_frames([b"x" * (2**20 + 1)])
    assert stranger.receive(timeout_s=1.0) is None
    # The trainer is unharmed: the honest worker is still served.
    lease = honest.lease()
    answers = [completion(tokenizer, "1"), completion(tokenizer, "2")]
    assert isinstance(honest.submit(submission(lease, answers)), m.Accept)


def test_a_flood_is_rate_limited_and_does_not_starve_an_honest_worker(
    swarm: Callable[..., SwarmServer], tokenizer: Any
) -> None:
    server = swarm(rate_limit_per_s=20.0, rate_limit_burst=20, max_open_leases=1)
    flood_context, honest_context = zmq.Context(), zmq.Context()
    flooder = Peer(flood_context, server.endpoint)
    flooder.hello("flooder")
    heartbeat = encode(m.Heartbeat(sent_at=0.0))
    flooding = threading.Event()
    flooding.set()

    def flood() -> None:
        while flooding.is_set():
            flooder.send_frames(heartbeat)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)  # the flood is on
        honest = Peer(honest_context, server.endpoint)
        honest.hello("honest")
        prove(server, "honest")
        answers = [completion(tokenizer, "1"), completion(tokenizer, "2")]
        slowest = 0.0
        for _ in range(5):
            started = time.monotonic()
            assert isinstance(honest.submit(submission(honest.lease(), answers)), m.Accept)
            slowest = max(slowest, time.monotonic() - started)
    finally:
        flooding.clear()
        thread.join()
    assert slowest < 2.0, f"an honest lease and submission took {slowest:.1f}s during the flood"
    table = server.worker_table()
    assert table["flooder"]["reasons"]["rate_limited"] > 20
    assert table["flooder"]["quarantined"]
    assert table["honest"]["samples"] == 10 and table["honest"]["rejected"] == 0
    time.sleep(1.5)  # the bucket refills: what remains is the quarantine
    while (answer := flooder.receive(timeout_s=0.2)) is not None:
        assert answer.reason == "rate_limited"  # the flood's answers, still queued
    refused = flooder.ask()
    assert isinstance(refused, m.Reject) and refused.reason == "quarantined", refused
    flood_context.destroy(linger=0)
    honest_context.destroy(linger=0)


def test_open_leases_per_worker_are_bounded(
    swarm: Callable[..., SwarmServer], context: zmq.Context
) -> None:
    server = swarm(max_open_leases=2)
    hoarder = Peer(context, server.endpoint)
    hoarder.hello("hoarder")
    prove(server, "hoarder")
    hoarder.lease()
    hoarder.lease()
    refused = hoarder.ask()
    assert isinstance(refused, m.Reject) and refused.reason == "too_many_leases", refused
    assert "2 leases open (at most 2)" in refused.detail
    assert not server.worker_table()["hoarder"]["quarantined"]  # bounded, not a fault


def test_a_worker_asking_ahead_waits_while_an_idle_one_has_no_lease(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    """Room for 2 prompts. An early asker (holding a lease, asking for the next) must not take
    the room a submission frees while an idle worker is waiting for it."""
    server = swarm()
    early = Peer(context, server.endpoint)
    early.hello("early")
    prove(server, "early")
    first = early.lease()
    early.lease()  # nobody is waiting yet: asking ahead is fine
    idle = Peer(context, server.endpoint)
    idle.hello("idle")
    full = idle.ask()
    assert isinstance(full, m.NoWork) and full.reason == "enough work is out", full
    wrong = [completion(tokenizer, "-1"), completion(tokenizer, "-2")]
    assert isinstance(early.submit(submission(first, wrong)), m.Accept)  # frees one prompt
    behind = early.ask()
    assert isinstance(behind, m.NoWork) and behind.reason == "an idle worker goes first", behind
    assert isinstance(idle.ask(), m.Lease)


def test_a_worker_asking_again_before_its_chain_arrived_gets_only_what_is_new(
    swarm: Callable[..., SwarmServer], context: zmq.Context
) -> None:
    server = swarm()
    for version in (1, 2):
        delta = Delta("demo", bytes([version]))
        server.weights.publish(Published(version, f"v{version}", b"", delta))
    peer = Peer(context, server.endpoint)
    peer.hello("behind")
    peer.send(m.WorkRequest(max_prompts=1, weights_version=0))
    assert [peer.receive().version for _ in range(2)] == [1, 2]  # the chain
    peer.send(m.WorkRequest(max_prompts=1, weights_version=1))  # applied 1, 2 not yet here
    assert peer.receive(timeout_s=1.0) is None  # the chain in flight is the answer
    server.weights.publish(Published(3, "v3", b"", Delta("demo", b"3")))
    peer.send(m.WorkRequest(max_prompts=1, weights_version=1))
    assert peer.receive().version == 3  # only what came after the chain in flight
    peer.send(m.WorkRequest(max_prompts=1, weights_version=-1))  # lost its copy:
    rebuild = [peer.receive() for _ in range(3)]  # rebuild from the base weights and the chain
    assert [(u.version, u.base_version) for u in rebuild] == [(1, 0), (2, 1), (3, 2)]
    server.weights.publish(Published(5, "v5", b"K", Delta("demo", b"5")))  # 4 missing: no chain
    peer.send(m.WorkRequest(max_prompts=1, weights_version=-1))
    keyframe = peer.receive()
    assert (keyframe.version, keyframe.codec, keyframe.base_version) == (5, "full", -1)
    peer.version = 5
    assert isinstance(peer.ask(), m.Lease)


def test_garbage_and_lies_quarantine_a_worker_and_its_leases_go_back(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    server = swarm()
    cheat = Peer(context, server.endpoint)
    cheat.hello("cheat")
    cheat.send_frames([b"\xc1 not msgpack"])
    assert cheat.receive().reason == "malformed"
    lease = cheat.lease()
    lie = completion(tokenizer, "12").model_copy(update={"text": "the answer is 75"})
    told = cheat.submit(submission(lease, [lie, lie]))
    assert isinstance(told, m.Reject) and told.reason == "text_mismatch", told
    held = cheat.lease()  # 1 + 2 faulty samples so far; this lease is open
    cheat.send(
        m.Lease(
            lease_id="x", policy_version=0, num_generations=2, deadline_s=1.0, prompts=held.prompts
        )
    )
    assert cheat.receive().reason == "unexpected"
    cheat.send_frames([b"\xc1"])  # 5 faults > quarantine_rejections 4, and all it sent
    assert cheat.receive().reason == "malformed"
    assert server.worker_table()["cheat"]["quarantined"]
    assert held.lease_id not in server.leases.open  # its open lease went back in the queue
    refused = cheat.ask()
    assert isinstance(refused, m.Reject) and refused.reason == "quarantined", refused
    assert "failed the trainer's checks" in refused.detail


def test_logprob_mismatches_from_the_training_step_quarantine_and_drop_buffered_work(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    server = swarm(quarantine_rejections=2)
    forger = Peer(context, server.endpoint)
    forger.hello("forger")
    lease = forger.lease()
    answers = [
        completion(tokenizer, answer_of(lease, server.intake.tasks)),
        completion(tokenizer, "0"),
    ]
    assert isinstance(forger.submit(submission(lease, answers)), m.Accept)
    assert len(server.buffer) == 1
    held = forger.lease()
    server.report_logprob_mismatches(
        [LogprobMismatch("forger", prompt_index=0, lag=0, mean_gap=3.1, max_gap=9.0)] * 3, []
    )
    row = server.worker_table()["forger"]
    assert row["reasons"] == {"logprob_mismatch": 1} and row["faults"] == 3
    assert row["quarantined"] and not server.leases.open and len(server.buffer) == 0
    requeued = {f"p{i}" for i in server.lease_state()["requeued"]}
    assert requeued == {lease.prompts[0].prompt_id, held.prompts[0].prompt_id}
    refused = forger.ask()
    assert isinstance(refused, m.Reject) and refused.reason == "quarantined", refused


# ---- end to end: the real CLI trainer, an honest worker and a forger ----------------------


def forge_until_quarantined(endpoint: str, tokenizer: Any, timeout_s: float) -> list[str]:
    """Forge every lease, replay the first submission once; the reasons of the Rejects, in order."""
    context = zmq.Context()
    forger, reasons, replayed = Peer(context, endpoint), [], False
    try:
        forger.hello("forger")
        deadline = time.monotonic() + timeout_s
        while "quarantined" not in reasons and time.monotonic() < deadline:
            answer = forger.ask()
            if isinstance(answer, m.WeightUpdate):
                forger.version = answer.version  # claims to hold them; never loads them
                continue
            if isinstance(answer, m.Lease):
                sent = m.Submission(
                    lease_id=answer.lease_id,
                    policy_version=answer.policy_version,
                    groups=forged_completions(answer, tokenizer),
                    generation_seconds=0.1,
                )
                answer = forger.submit(sent)
                if isinstance(answer, m.Accept) and not replayed:
                    answer, replayed = forger.submit(sent), True
            if isinstance(answer, m.Reject):
                reasons.append(answer.reason)
            else:  # accepted, no work for now, or no answer
                time.sleep(0.5)
    finally:
        context.destroy(linger=0)
    return reasons


@pytest.mark.e2e
def test_forged_completions_are_screened_out_and_the_forger_quarantined_while_training_goes_on(
    model_path: str, tmp_path: Path, tokenizer: Any
) -> None:
    folder = tmp_path / "attacked"
    trainer, endpoint = start_trainer(
        tmp_path, "attacked", 2, "--swarm.quarantine_rejections", "10"
    )
    honest = start_worker(tmp_path, endpoint, "honest")
    try:
        wait_for_text(folder / "trainer.log", "listening on", 120, trainer)
        reasons = forge_until_quarantined(endpoint, tokenizer, timeout_s=400)
        assert trainer.wait(timeout=400) == 0, (tmp_path / "attacked-console.log").read_text()[
            -3000:
        ]
    finally:
        for process in (honest, trainer):
            if process.poll() is None:
                process.kill()
    assert reasons[0] == "duplicate" and reasons[-1] == "quarantined", reasons
    log = (folder / "trainer.log").read_text()
    assert re.search(r"forger: \d+ sequences failed the log-prob check", log)
    assert "forger quarantined" in log and "honest: " not in log
    ledger = json.loads((folder / "workers.json").read_text())["workers"]
    assert ledger["forger"]["quarantined"] and "logprob_mismatch" in ledger["forger"]["reasons"]
    assert ledger["honest"]["samples"] > 0 and ledger["honest"]["rejected"] == 0
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["kind"] == "train"] == [1, 2]
    # Screened before a step (the forger was new): no forged sequence took a step's slot.
    assert re.search(r"screened \d+ groups from new workers: [1-9]\d* failed", log), log
    assert sum(s["logprob_rejected"] for s in steps if s["kind"] == "train") == 0
    status = subprocess.run(
        [sys.executable, "-m", "swarmrl", "status", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[2:]}
    assert rows["forger"] == "quarantined" and rows["honest"] in ("connected", "left"), rows
