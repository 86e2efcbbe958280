"""Run a benchmark's child command and sample its memory: the one RSS sampler benchmarks share."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil


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
