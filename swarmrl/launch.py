"""`swarmrl run`: the trainer in this process and N rollout workers as child processes.

Workers are started as soon as the trainer listens (they load the model while the trainer
measures the starting accuracy), each as `python -m swarmrl.rollout` with its own log file in
the run folder. Ctrl-C reaches the whole process group: the trainer saves a checkpoint and stops,
the workers say bye; any worker still alive after a grace period is terminated.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from swarmrl.config import Config

log = logging.getLogger("trainer")


def worker_command(endpoint: str, name: str, config: Config, folder: Path) -> list[str]:
    swarm = config.swarm
    return [
        sys.executable, "-m", "swarmrl.rollout", "--connect", endpoint, "--name", name,
        "--backend", swarm.backend, "--threads", str(swarm.worker_threads),
        "--max-prompts", str(swarm.prompts_per_lease), "--log-dir", str(folder),
        "--console-level", "warning", "--exit-with-parent",
    ]  # fmt: skip


def run_local(config: Config, folder: Path, workers: int, resume: bool) -> dict[str, Any]:
    from swarmrl.trainer.loop import train

    children: list[subprocess.Popen] = []

    def start_workers(endpoint: str) -> None:
        environment = dict(os.environ, OMP_NUM_THREADS=str(config.swarm.worker_threads))
        for i in range(1, workers + 1):
            command = worker_command(endpoint, f"worker-{i}", config, folder)
            children.append(subprocess.Popen(command, env=environment))
        if workers:
            log.info("started %d local workers (logs in %s)", workers, folder)

    try:
        return train(config, folder, resume=resume, on_ready=start_workers)
    finally:
        stop_children(children)


def stop_children(children: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
