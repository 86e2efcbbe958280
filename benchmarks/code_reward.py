"""Code reward throughput: programs checked per second in the bubblewrap sandbox versus bare
subprocesses (same rlimits, no bwrap) on the same programs, with the pool at 1 and 2 workers.

The programs are the reference solutions of the shipped code tasks (recipes/data/, assert
tests, all passing), so every run does the real work: start, define, run three asserts.
Bare runs see the interpreter's site-packages (and run its .pth hooks) while the sandbox hides
them, so the sandbox's own cost is also timed alone: `bwrap ... /usr/bin/true` against
`/usr/bin/true`, both under the same `prlimit`.

    python benchmarks/code_reward.py [--repeats 3]

Prints a table and writes benchmarks/results/code_reward.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from swarmrl.rewards import sandbox
from swarmrl.rewards.code import score_programs, task_tests
from swarmrl.rewards.sandbox import Limits, check_sandbox

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data"
RESULTS = Path(__file__).resolve().parent / "results" / "code_reward.json"


def load_programs() -> tuple[list[str], list]:
    rows = [
        json.loads(line)
        for name in ("code_train.jsonl", "code_test.jsonl")
        for line in (DATA / name).read_text().splitlines()
    ]
    return [row["answer"] for row in rows], [task_tests(row) for row in rows]


def measure(programs: list[str], tests: list, sandbox: bool, workers: int, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.monotonic()
        scores = score_programs(programs, tests, limits=Limits(), workers=workers, sandbox=sandbox)
        times.append(time.monotonic() - start)
        if scores != [1.0] * len(programs):
            raise RuntimeError(f"reference solutions failed: {scores}")
    best = min(times)
    return {
        "mode": "bwrap sandbox" if sandbox else "bare subprocess",
        "workers": workers,
        "programs": len(programs),
        "seconds_best": round(best, 3),
        "seconds_median": round(statistics.median(times), 3),
        "programs_per_s": round(len(programs) / best, 1),
        "ms_per_program": round(1000 * best * workers / len(programs), 1),
    }


def setup_cost(runs: int) -> dict:
    """Milliseconds per start of an empty command, bare and in the sandbox (same rlimits)."""
    script, info = os.memfd_create("main.py"), os.memfd_create("info")
    bare = [*sandbox._limit_args(Limits()), "/usr/bin/true"]
    boxed = sandbox._bwrap_args(Limits(), script, info) + sandbox._limit_args(Limits())
    costs = {}
    for name, command in (("bare_ms", bare), ("sandbox_ms", [*boxed, "/usr/bin/true"])):
        start = time.monotonic()
        for _ in range(runs):
            subprocess.run(command, pass_fds=[script, info], env={}, check=True)
        costs[name] = round(1000 * (time.monotonic() - start) / runs, 1)
    os.close(script)
    os.close(info)
    costs["sandbox_setup_ms"] = round(costs["sandbox_ms"] - costs["bare_ms"], 1)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    check_sandbox()
    programs, tests = load_programs()
    rows = [
        measure(programs, tests, sandbox, workers, args.repeats)
        for workers in (1, 2)
        for sandbox in (False, True)
    ]
    by_key = {(row["mode"], row["workers"]): row for row in rows}
    overhead = {
        f"workers_{w}": round(
            by_key[("bwrap sandbox", w)]["seconds_best"]
            / by_key[("bare subprocess", w)]["seconds_best"],
            2,
        )
        for w in (1, 2)
    }
    setup = setup_cost(runs=50)
    bwrap = subprocess.run(["bwrap", "--version"], capture_output=True, text=True).stdout.strip()
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "bwrap": bwrap,
            "as_root": os.geteuid() == 0,
        },
        "rows": rows,
        "sandbox_time_over_bare": overhead,
        "empty_command": setup,
    }
    print(f"{'mode':<16} {'workers':>7} {'programs':>8} {'best s':>7} {'prog/s':>7} {'ms/prog':>8}")
    for row in rows:
        timing = f"{row['seconds_best']:>7.2f} {row['programs_per_s']:>7.1f}"
        print(
            f"{row['mode']:<16} {row['workers']:>7} {row['programs']:>8} "
            f"{timing} {row['ms_per_program']:>8.1f}"
        )
    print(f"sandbox time / bare time: {overhead}")
    print(f"empty command (/usr/bin/true), one at a time: {setup}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
