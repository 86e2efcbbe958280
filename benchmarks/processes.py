"""The RSS samplers benchmarks share: `watch` runs a child command and samples its process
tree every second; `Sampler` samples this process every 2 ms, phase by phase."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20


def watch(command: list[str], log: Path) -> dict:
    """Run `command` (output to `log`); sample the RSS of it and of its whole process tree
    every second. SystemExit naming the log if it fails."""
    started = time.time()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        root, peak_root, peak_tree = psutil.Process(process.pid), 0, 0
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                rss = {p.pid: p.memory_info().rss for p in tree if p.is_running()}
                peak_root = max(peak_root, rss.get(root.pid, 0))
                peak_tree = max(peak_tree, sum(rss.values()))
            except psutil.Error:
                pass  # a process ended between listing and reading it
            time.sleep(1)
    if process.wait() != 0:
        raise SystemExit(f"{command[:4]} failed; see {log}")
    return {
        "started": started,
        "wall_s": time.time() - started,
        "trainer_peak_rss_mb": round(peak_root / 2**20),
        "all_processes_peak_rss_mb": round(peak_tree / 2**20),
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class Sampler:
    """The highest RSS seen since the last `phase()`, from a thread polling every 2 ms."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self.lock = threading.Lock()
        self.rows: list[dict[str, Any]] = []
        self.started = time.monotonic()
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while True:
            with self.lock:
                self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def phase(self, name: str) -> None:
        with self.lock:
            now, peak = rss_bytes(), self.peak
            self.peak = now
        row = {
            "phase": name,
            "rss_mb": round(now / MB),
            "phase_peak_mb": round(max(peak, now) / MB),
            "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "seconds": round(time.monotonic() - self.started, 1),
        }
        self.rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
