"""A hostile open swarm: what strangers can make the trainer do stays bounded, and the trainer's
own rules cannot be turned against honest workers. One test per weakness found from outside
(docs/security.md, "Cost per stranger"); each drives the real SwarmServer over real ZeroMQ."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq

from swarmrl.protocol import messages as m
from swarmrl.protocol.framing import encode
from swarmrl.trainer.ledger import Ledger, format_table
from swarmrl.trainer.publish import Delta, Published
from swarmrl.trainer.server import SwarmServer
from tests.peers import Peer, answer_of, completion, prove, submission

KEYFRAME_MB = 40


def keyframe(version: int) -> Published:
    """A version whose keyframe is big (a fresh bytes object per version, as the trainer's)."""
    return Published(version, f"v{version}", bytes([version]) * (KEYFRAME_MB * 2**20))


def test_a_keyframe_is_sent_once_per_version_and_strangers_share_a_budget(
    swarm: Callable[..., SwarmServer], context: zmq.Context
) -> None:
    server = swarm()
    server.weights.publish(keyframe(1))  # no delta chain: a worker without a copy needs this
    puller = Peer(context, server.endpoint)
    puller.hello("puller")
    puller.send(m.WorkRequest(max_prompts=1, weights_version=-1))
    first = puller.receive()
    assert (first.version, first.codec) == (1, "full")
    for _ in range(5):  # asking again, as fast as it can read
        puller.send(m.WorkRequest(max_prompts=1, weights_version=-1))
        again = puller.receive()
        assert isinstance(again, m.NoWork) and "already" in again.reason, again
    # Another new connection from the same address may have one (the budget's burst is 2) ...
    for name in ("second", "third"):
        peer = Peer(context, server.endpoint)
        peer.hello(name)
        peer.send(m.WorkRequest(max_prompts=1, weights_version=-1))
        answers = [peer.receive()]
        if name == "third":  # ... and then the address's budget for new workers is spent
            assert isinstance(answers[0], m.NoWork) and "used up" in answers[0].reason, answers
        else:
            assert answers[0].codec == "full"


@pytest.mark.parametrize("proven", [False, True], ids=["new", "proven"])
def test_a_peer_that_never_reads_pins_one_keyframe_not_one_per_version(
    swarm: Callable[..., SwarmServer], context: zmq.Context, proven: bool
) -> None:
    """The stalled reader holds its TCP connection open and reads nothing (a tiny receive
    queue): before, every version's keyframe stayed queued for it; now at most the first,
    even for a worker proven honest (which has no keyframe budget)."""
    server = swarm()
    stalled = context.socket(zmq.DEALER)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.IDENTITY, b"stalled-reader")
    stalled.connect(server.endpoint)
    hello = m.Hello(
        worker_name="stalled", backend="hf", software_version="t", max_prompts_per_lease=1
    )
    stalled.send_multipart(encode(hello))
    time.sleep(0.5)
    if proven:
        prove(server, "stalled")
    process = psutil.Process()
    before = process.memory_info().rss
    for version in range(1, 6):
        server.weights.publish(keyframe(version))
        stalled.send_multipart(encode(m.WorkRequest(max_prompts=1, weights_version=-1)))
        time.sleep(0.3)
    grown = (process.memory_info().rss - before) / 2**20
    # The publisher holds the current keyframe; the stalled peer pins at most one more.
    assert grown < 3.5 * KEYFRAME_MB, f"RSS grew {grown:.0f} MB for {KEYFRAME_MB} MB keyframes"
    stalled.close(linger=0)


def test_a_poisoned_name_is_not_inherited(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    server = swarm()
    attacker = Peer(context, server.endpoint)
    attacker.hello("worker")
    for _ in range(5):
        attacker.send_frames([b"\xc1"])
        attacker.receive()
    assert server.worker_table()["worker"]["quarantined"]
    attacker.send(m.Bye(reason="done"))
    # A real worker that comes later under that name is a new connection: a new record.
    honest = Peer(context, server.endpoint)
    spec = honest.hello("worker")
    assert spec.worker_id != "worker"
    lease = honest.lease()
    gold = answer_of(lease, server.intake.tasks)
    work = submission(lease, [completion(tokenizer, gold), completion(tokenizer, "0")])
    assert isinstance(honest.submit(work), m.Accept)
    row = server.worker_table()[spec.worker_id]
    assert not row["quarantined"] and row["samples"] == 2


def test_a_reconnecting_worker_keeps_its_record_and_its_quarantine(
    swarm: Callable[..., SwarmServer], context: zmq.Context
) -> None:
    server = swarm()
    cheat = Peer(context, server.endpoint)
    cheat.hello("cheat")
    for _ in range(5):
        cheat.send_frames([b"\xc1"])
        cheat.receive()
    again = cheat.hello("a-new-name")  # the same connection, a new hello
    assert again.worker_id == "cheat"
    refused = cheat.ask()
    assert isinstance(refused, m.Reject) and refused.reason == "quarantined", refused
    assert len([name for name in server.worker_table() if "new" in name]) == 0


def test_a_flood_does_not_hold_off_the_silence_check(
    swarm: Callable[..., SwarmServer], context: zmq.Context
) -> None:
    server = swarm(
        heartbeat_timeout_s=2.0,
        heartbeat_interval_s=0.5,
        rate_limit_per_s=1e6,
        rate_limit_burst=10**6,
    )
    silent = Peer(context, server.endpoint)
    silent.hello("silent")
    prove(server, "silent")
    lease = silent.lease()  # then it never speaks again
    flooder_context = zmq.Context()
    flooder = Peer(flooder_context, server.endpoint)
    flooder.hello("flooder")
    beat = encode(m.Heartbeat(sent_at=0.0))
    flooding = threading.Event()
    flooding.set()

    def flood() -> None:
        while flooding.is_set():
            flooder.send_frames(beat)

    thread = threading.Thread(target=flood, daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        while lease.lease_id in server.leases.open and time.monotonic() - started < 30:
            time.sleep(0.05)
        waited = time.monotonic() - started
    finally:
        flooding.clear()
        thread.join()
        flooder_context.destroy(linger=0)
    assert lease.lease_id not in server.leases.open
    # heartbeat_timeout_s plus one check period (0.5 s), with slack for a loaded machine
    assert waited < 2.0 + 0.5 + 1.5, f"the silent worker was dropped after {waited:.1f}s"


def test_junk_from_a_new_worker_buys_nothing_and_burns_no_prompt(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    server = swarm(quarantine_rejections=4, quarantine_fraction=0.5)
    junk = Peer(context, server.endpoint)
    junk.hello("junk")
    burned = []
    for _ in range(6):  # the same wrong answer twice: no reward spread, made-up log-probs
        lease = junk.lease()
        burned.append(lease.prompts[0].prompt_id)
        same = [completion(tokenizer, "7", -0.01), completion(tokenizer, "7", -0.02)]
        assert isinstance(junk.submit(submission(lease, same)), m.Accept)
    row = server.worker_table()["junk"]
    assert row["samples"] == 0 and row["unscored"] == 12  # counts toward neither side
    requeued = {f"p{i}" for i in server.lease_state()["requeued"]}
    assert set(burned) <= requeued  # every junk prompt goes back to be leased again
    for _ in range(5):  # 5 faults > 4, all it sent: the junk bought it no room
        junk.send_frames([b"\xc1"])
        junk.receive()
    assert server.worker_table()["junk"]["quarantined"]


def test_versions_from_the_future_are_refused(
    swarm: Callable[..., SwarmServer], context: zmq.Context
) -> None:
    server = swarm()
    liar = Peer(context, server.endpoint)
    liar.hello("liar")
    liar.send(m.WorkRequest(max_prompts=1, weights_version=1000))
    refused = liar.receive()
    assert isinstance(refused, m.Reject) and refused.reason == "future_version", refused
    assert "claims version 1000; the trainer is at 0" in refused.detail
    assert not server.leases.open


def test_control_characters_from_workers_are_refused_and_escaped(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tmp_path: Path
) -> None:
    server = swarm()
    forger = Peer(context, server.endpoint)
    hello = {
        "v": m.PROTOCOL_VERSION,
        "type": "hello",
        "protocol_version": m.PROTOCOL_VERSION,
        "worker_name": "x\n12:00:00 trainer  DEBUG step 9999 trained on p1",
        "backend": "hf",
        "software_version": "t",
        "max_prompts_per_lease": 1,
        "weights_version": -1,
    }
    forger.send_frames([msgpack.packb(hello)])
    refused = forger.receive()
    assert isinstance(refused, m.Reject) and refused.reason == "invalid", refused
    forger.hello("forger")
    bye = {"v": m.PROTOCOL_VERSION, "type": "bye", "reason": "ok\n\x1b[2J\x1b[31mstep 9999"}
    forger.send_frames([msgpack.packb(bye)])
    refused = forger.receive()
    assert isinstance(refused, m.Reject) and refused.reason == "invalid", refused
    # A ledger written by anything else is still printed with its escapes made visible.
    table = Ledger(server.config.swarm).table(time.monotonic())
    table["evil\x1b[2J"] = server.worker_table()["forger"]
    assert "\x1b" not in format_table(table, time.time()) and "evil\\x1b[2J" in format_table(
        table, time.time()
    )


def test_the_ledger_stays_bounded_under_a_hello_storm() -> None:
    from swarmrl.base.config import SwarmConfig

    ledger = Ledger(SwarmConfig(), max_records=100)
    started = time.perf_counter()
    for n in range(20_000):
        record = ledger.join("storm", n.to_bytes(4, "little"), now=float(n))
        ledger.reject(record, "malformed")
        ledger.leave(record)
    contributor = ledger.join("honest", b"honest", now=0.0)
    ledger.accept(contributor, 8)
    ledger.leave(contributor)
    assert len(ledger.records) <= 101
    table = ledger.table(now=20_000.0)
    assert table["honest"]["samples"] == 8  # a contributor is never folded away
    assert table["(departed)"]["workers"] >= 19_900
    assert table["(departed)"]["reasons"]["malformed"] >= 19_900
    assert time.perf_counter() - started < 20


def test_strangers_cost_o1_and_leave_no_trace(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    server = swarm()
    honest = Peer(context, server.endpoint)
    honest.hello("honest")
    bulk = b"\x81" + b"x" * 60_000  # a 60 KB frame from connections that never said hello
    strangers = [Peer(context, server.endpoint) for _ in range(20)]
    for _ in range(5):
        for stranger in strangers:
            stranger.send_frames([bulk])
    assert all(s.receive(timeout_s=0.2) is None for s in strangers[:3])  # not even answered
    assert set(server.worker_table()) == {"honest"}
    lease = honest.lease()
    work = submission(lease, [completion(tokenizer, "1"), completion(tokenizer, "2")])
    assert isinstance(honest.submit(work), m.Accept)


def test_lease_hoarders_do_not_starve_a_proven_worker(
    swarm: Callable[..., SwarmServer], context: zmq.Context
) -> None:
    server = swarm()  # room: 2 prompts (prompts_per_step 2 x max_staleness 1)
    hoarders = [Peer(context, server.endpoint) for _ in range(6)]
    held = 0
    for number, hoarder in enumerate(hoarders):
        hoarder.hello(f"hoarder-{number}")
        answer = hoarder.ask()
        held += isinstance(answer, m.Lease)
        refused = hoarder.ask()  # a second lease before proving anything: no
        assert not isinstance(refused, m.Lease), refused
    assert held <= 2  # new workers share at most their part of the room
    honest = Peer(context, server.endpoint)
    honest.hello("honest")
    prove(server, "honest")
    assert isinstance(honest.ask(), m.Lease)  # hoarded leases don't count against it


def test_an_old_protocol_version_is_refused_with_a_clear_message(
    swarm: Callable[..., SwarmServer], context: zmq.Context
) -> None:
    server = swarm()
    old = Peer(context, server.endpoint)
    frame = msgpack.packb(
        {
            "v": 1,
            "type": "hello",
            "protocol_version": 1,
            "worker_name": "old",
            "backend": "hf",
            "software_version": "0.0.9",
            "max_prompts_per_lease": 1,
            "weights_version": -1,
        }
    )
    old.send_frames([frame])
    refused = old.receive()
    assert isinstance(refused, m.Reject) and refused.reason == "bad_version", refused
    assert re.search(
        rf"protocol version {m.PROTOCOL_VERSION} expected, received 1", refused.detail
    ), refused.detail


def test_a_worker_without_a_copy_rebuilds_from_the_base_and_the_chain(
    swarm: Callable[..., SwarmServer], context: zmq.Context
) -> None:
    server = swarm()
    for version in (1, 2):
        server.weights.publish(Published(version, f"v{version}", b"K", Delta("demo", b"d")))
    lost = Peer(context, server.endpoint)
    lost.hello("lost")
    lost.send(m.WorkRequest(max_prompts=1, weights_version=-1))
    chain = [lost.receive(), lost.receive()]
    assert [(u.version, u.base_version, u.codec) for u in chain] == [(1, 0, "demo"), (2, 1, "demo")]


@pytest.mark.e2e
def test_a_trainer_that_dies_leaves_a_trace(model_path: str, tmp_path: Path) -> None:
    import signal

    from tests.conftest import start_trainer, wait_for_text

    trainer, _ = start_trainer(tmp_path, "crash", 50)
    folder = tmp_path / "crash"
    try:
        wait_for_text(folder / "trainer.log", "listening on", 180, trainer)
        trainer.send_signal(signal.SIGSEGV)
        trainer.wait(timeout=60)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    faults = (folder / "faults.log").read_text()
    assert "Fatal Python error: Segmentation fault" in faults
    assert "most recent call first" in faults  # every thread's stack


def test_an_uncaught_exception_is_logged_with_its_thread(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import threading\n"
        "from pathlib import Path\n"
        "from swarmrl.base.logs import setup_logging, trace_crashes\n"
        f"folder = Path({str(tmp_path)!r})\n"
        "trace_crashes(folder, setup_logging('trainer', folder))\n"
        "thread = threading.Thread(target=lambda: 1 / 0, name='swarm-server')\n"
        "thread.start(); thread.join()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)
    log = (tmp_path / "trainer.log").read_text()
    assert "uncaught ZeroDivisionError in thread swarm-server" in log
    assert "Traceback" in log and (tmp_path / "faults.log").exists()


@pytest.mark.e2e
def test_a_worker_without_a_name_keeps_working_after_an_attacker_poisoned_worker(
    model_path: str, tmp_path: Path
) -> None:
    """As the README starts one (`swarmrl worker --connect ...`, no --name), after a stranger
    got the name `worker` quarantined and left."""
    import json

    from tests.conftest import start_trainer, start_worker, wait_for_text

    folder = tmp_path / "poisoned"
    trainer, endpoint = start_trainer(tmp_path, "poisoned", 1)
    worker = None
    context = zmq.Context()
    try:
        wait_for_text(folder / "trainer.log", "listening on", 180, trainer)
        attacker = Peer(context, endpoint)
        attacker.hello("worker")
        for _ in range(25):  # quarantine_rejections 20: 25 faults, nothing accepted
            attacker.send_frames([b"\xc1"])
            attacker.receive()
        refused = attacker.ask()
        assert isinstance(refused, m.Reject) and refused.reason == "quarantined", refused
        attacker.send(m.Bye(reason="gone"))
        worker = start_worker(tmp_path, endpoint, "")  # no name given
        assert trainer.wait(timeout=600) == 0, (tmp_path / "poisoned-console.log").read_text()[
            -3000:
        ]
    finally:
        context.destroy(linger=0)
        for process in (worker, trainer):
            if process is not None and process.poll() is None:
                process.kill()
    ledger = json.loads((folder / "workers.json").read_text())["workers"]
    assert ledger["worker"]["quarantined"]
    [mine] = [name for name in ledger if name.startswith("worker-")]
    assert re.fullmatch(r"worker-[0-9a-f]{8}", mine), mine  # a name nobody could predict
    assert ledger[mine]["samples"] > 0 and not ledger[mine]["quarantined"]


def test_a_worker_whose_groups_pass_a_training_step_is_proven(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    """With no screening (a sharded trainer), the step's own check proves workers."""
    server = swarm()
    worker = Peer(context, server.endpoint)
    worker.hello("steady")
    for _ in range(2):
        lease = worker.lease()
        gold = answer_of(lease, server.intake.tasks)
        work = submission(lease, [completion(tokenizer, gold), completion(tokenizer, "0")])
        assert isinstance(worker.submit(work), m.Accept)
    batch = server.next_batch(timeout_s=1.0)  # no screen: as under torchrun
    assert batch is not None and not server.worker_table()["steady"]["proven"]
    server.report_logprob_mismatches([], batch)
    assert server.worker_table()["steady"]["proven"]


def test_junk_prompts_come_back_after_fresh_ones_not_straight_away() -> None:
    from swarmrl.trainer.leases import DEFER_PROMPTS, LeaseBook

    leases = LeaseBook(seed=0, lease_timeout_s=60.0, id_prefix="L")
    first = leases.issue("new", 2, 0, now=0.0)
    leases.close(first.lease_id, "new", now=1.0)
    leases.defer(first.prompt_indices)  # no reward spread from a worker not yet proven
    issued = [i for _ in range(DEFER_PROMPTS) for i in leases.issue("w", 1, 0, 2.0).prompt_indices]
    assert not set(first.prompt_indices) & set(issued)  # fresh ones first ...
    assert leases.issue("w", 2, 0, 3.0).prompt_indices == first.prompt_indices  # ... then these
    assert set(first.prompt_indices) <= set(leases.state()["requeued"]) | set(issued) | {0, 1}


def test_screening_refuses_a_new_workers_failing_groups_and_proves_the_rest(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    from swarmrl.trainer.logprob_check import LogprobMismatch

    server = swarm()
    peers = {name: Peer(context, server.endpoint) for name in ("good", "bad")}
    for name, peer in peers.items():
        peer.hello(name)
        lease = peer.lease()
        gold = answer_of(lease, server.intake.tasks)
        work = submission(lease, [completion(tokenizer, gold), completion(tokenizer, "0")])
        assert isinstance(peer.submit(work), m.Accept)

    def screen(groups: list) -> list:
        return [
            LogprobMismatch(g.worker_id, g.prompt_index, 0, 4.0, 9.0)
            for g in groups
            if g.worker_id == "bad"
        ]

    assert server.next_batch(timeout_s=1.0, screen=screen) is None  # refused: no step
    table = server.worker_table()
    assert table["good"]["proven"] and not table["bad"]["proven"]
    assert table["bad"]["reasons"] == {"logprob_mismatch": 1}
    assert len(server.buffer) == 1  # the good group is back, the bad one's prompt requeued
    assert len(server.lease_state()["requeued"]) == 2  # the buffered one is owed too


def test_while_a_step_waits_new_workers_are_screened_and_proven(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any
) -> None:
    from swarmrl.trainer.logprob_check import LogprobMismatch

    server = swarm()  # prompts_per_step 2: one group each is not enough for a step
    checked: list = []

    def screen(groups: list) -> list:
        checked.extend(groups)
        return [
            LogprobMismatch(g.worker_id, g.prompt_index, 0, 4.0, 9.0)
            for g in groups
            if g.worker_id == "bad"
        ]

    for name in ("good", "bad"):
        peer = Peer(context, server.endpoint)
        peer.hello(name)
        lease = peer.lease()
        gold = answer_of(lease, server.intake.tasks)
        work = submission(lease, [completion(tokenizer, gold), completion(tokenizer, "0")])
        assert isinstance(peer.submit(work), m.Accept)
        checked.clear()
        assert server.next_batch(timeout_s=0.1, screen=screen) is None  # too few, or refused
        assert [g.worker_id for g in checked] == [name]  # only the newcomer's group: checked
    table = server.worker_table()
    assert table["good"]["proven"] and not table["bad"]["proven"]
    assert table["bad"]["reasons"] == {"logprob_mismatch": 1}
    assert [g.worker_id for g in server.buffer.peek()] == ["good"]  # kept, for the next step


def test_a_new_workers_groups_without_spread_are_credited_once_checked(
    swarm: Callable[..., SwarmServer], context: zmq.Context, tokenizer: Any, tmp_path: Path
) -> None:
    from swarmrl.trainer.contributions import ContributionLedger, totals
    from swarmrl.trainer.logprob_check import LogprobMismatch

    server = swarm()
    server.intake.contributions = ContributionLedger(tmp_path)

    def screen(groups: list) -> list:
        return [
            LogprobMismatch(g.worker_id, g.prompt_index, 0, 4.0, 9.0)
            for g in groups
            if g.worker_id == "liar"
        ]

    for name in ("honest", "liar"):  # all wrong: no spread, so no credit yet
        peer = Peer(context, server.endpoint)
        peer.hello(name)
        lease = peer.lease()
        wrong = [completion(tokenizer, "0"), completion(tokenizer, "0")]
        assert isinstance(peer.submit(submission(lease, wrong)), m.Accept)
        assert server.worker_table()[name]["samples"] == 0
    assert server.next_batch(timeout_s=0.1, screen=screen) is None  # the trainer waits: checks
    table = server.worker_table()
    assert table["honest"]["proven"] and table["honest"]["samples"] == 2
    assert table["honest"]["unscored"] == 0
    assert not table["liar"]["proven"] and table["liar"]["samples"] == 0
    assert table["liar"]["reasons"] == {"logprob_mismatch": 1}
    server.intake.contributions.close()
    chain = totals(tmp_path)
    assert chain["honest"]["accepted_samples"] == 2 and chain["honest"]["accepted_leases"] == 1
    assert "liar" not in chain or chain["liar"]["credited_samples"] == 0  # nothing revoked
    assert len(server.buffer) == 0  # groups without a spread never train
