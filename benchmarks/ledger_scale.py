"""What the worker ledger costs when strangers come by the hundred thousand.

Every identity that says hello gets a record (trainer/ledger.py). Before the ledger was bounded,
20 s of hellos from 200 identities left 60,224 records: building the table took 131 ms, the
progress summary 78 ms and writing workers.json 831 ms per step. Now departed records that
contributed nothing are folded into one `(departed)` row beyond `MAX_RECORDS`.

This joins N identities (each says hello, a tenth of them is refused once, and each leaves),
with 10 honest workers connected throughout, then times what the trainer does with the ledger:
build the table (every idle second and every step), summarise it for the progress line, and
write workers.json (every step). Side by side: the same with 10 identities only.

    python benchmarks/ledger_scale.py [--identities 100000]

Prints a table and writes benchmarks/results/ledger_scale.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from swarmrl.base.config import SwarmConfig
from swarmrl.trainer.ledger import Ledger, write_ledger
from swarmrl.trainer.progress import ledger_summary

RESULTS = Path(__file__).resolve().parent / "results" / "ledger_scale.json"


def timed(function, repeats: int = 20) -> float:
    """Median milliseconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(1000 * (time.perf_counter() - started))
    return sorted(times)[len(times) // 2]


def measure(identities: int) -> dict[str, float]:
    ledger = Ledger(SwarmConfig())
    now = time.monotonic()
    for honest in range(10):
        record = ledger.join("honest", f"h{honest}".encode(), now, address="10.0.0.1")
        ledger.accept(record, 64)
    started = time.perf_counter()
    for number in range(identities):
        address = f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}"
        record = ledger.join("", f"s{number}".encode(), now, address=address)
        if number % 10 == 0:
            ledger.reject(record, "bad_message")
        ledger.leave(record)
    churn_us = 1e6 * (time.perf_counter() - started) / identities if identities else float("nan")
    table = ledger.table(now)
    total = sum(w["samples"] for w in table.values())
    with tempfile.TemporaryDirectory() as folder:
        write_ms = timed(lambda: write_ledger(Path(folder), table))
        size = (Path(folder) / "workers.json").stat().st_size
    return {
        "identities": identities + 10,
        "records": len(ledger.records),
        "hello_and_leave_us": churn_us,
        "table_ms": timed(lambda: ledger.table(now)),
        "summary_ms": timed(lambda: ledger_summary(table, total)),
        "write_ms": write_ms,
        "workers_json_bytes": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=100_000)
    arguments = parser.parse_args()
    rows = [measure(0), measure(arguments.identities)]
    columns = list(rows[0])
    print(" | ".join(f"{c:>18}" for c in columns))
    for row in rows:
        print(
            " | ".join(
                f"{row[c]:>18.3f}" if isinstance(row[c], float) else f"{row[c]:>18}"
                for c in columns
            )
        )
    ratio = {c: rows[1][c] / rows[0][c] for c in ("table_ms", "summary_ms", "write_ms")}
    print("ratio, many / 10:", ", ".join(f"{c} {v:.1f}x" for c, v in ratio.items()))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
