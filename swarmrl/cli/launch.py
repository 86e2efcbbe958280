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

from swarmrl.base.config import Config

log = logging.getLogger("trainer")


def worker_command(endpoint: str, name: str, config: Config, folder: Path) -> list[str]:
    swarm = config.swarm
    return [
        sys.executable,
        "-m",
        "swarmrl.rollout",
        "--connect",
        endpoint,
        "--name",
        name,
        "--backend",
        swarm.backend,
        "--threads",
        str(swarm.worker_threads),
        "--max-prompts",
        str(swarm.prompts_per_lease),
        "--log-dir",
        str(folder),
        "--console-level",
        "warning",
        "--exit-with-parent",
        # A closed swarm: local workers use the trainer's own key pair, which it accepts.
        *(
            ["--key", swarm.trainer_key, "--trainer-key", swarm.trainer_key]
            if swarm.allow_keys and swarm.trainer_key
            else []
        ),
    ]


def run_local(config: Config, folder: Path, workers: int, resume: bool) -> dict[str, Any]:
    close_swarm(config, folder)  # before the heavy imports: a bad key file fails at once
    from swarmrl.trainer.loop import train

    children: list[subprocess.Popen] = []
    if config.trainer.threads is None and workers:
        # Oversubscribed CPU threads stall torch's parallel kernels (measured: a 13 s train
        # step took 80 s beside two generating workers): the trainer takes the cores the
        # local workers leave, at least one. (Irrelevant for a trainer on a GPU.)
        spare = (os.cpu_count() or 1) - workers * config.swarm.worker_threads
        config.trainer.threads = max(1, spare)

    names = [f"worker-{i}" for i in range(1, workers + 1)]

    def start_workers(endpoint: str) -> None:
        environment = dict(os.environ, OMP_NUM_THREADS=str(config.swarm.worker_threads))
        for name in names:
            command = worker_command(endpoint, name, config, folder)
            children.append(subprocess.Popen(command, env=environment))
        if workers:
            log.info("started %d local workers (logs in %s)", workers, folder)

    try:
        return train(config, folder, resume, start_workers, local_workers=frozenset(names))
    finally:
        stop_children(children)


def close_swarm(config: Config, folder: Path) -> None:
    """With `swarm.allow_keys`: the trainer's key pair (generated into the run folder unless
    the recipe names one, reused on resume), absolute key paths (the run's config.toml must
    work from anywhere), and both key files checked now rather than after the model loads."""
    swarm = config.swarm
    if swarm.allow_keys is None:
        return
    from swarmrl.protocol.auth import load_key_pair, new_key_pair, read_allowlist

    swarm.allow_keys = str(Path(swarm.allow_keys).expanduser().resolve())
    read_allowlist(swarm.allow_keys)
    if swarm.trainer_key is None:
        secret = folder / "trainer.key_secret"
        if not secret.exists():
            new_key_pair(folder, "trainer")
            log.info("closed swarm: generated the trainer's key pair %s", secret)
        swarm.trainer_key = str(secret)
    swarm.trainer_key = str(Path(swarm.trainer_key).expanduser().resolve())
    load_key_pair(swarm.trainer_key)


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


def run_per_gpu(arguments: list[str], gpus: list[str], name: str) -> int:
    """`swarmrl worker --gpus 0,1,...`: one worker process (one engine) per GPU."""
    children = []
    for gpu in gpus:
        command = [
            sys.executable,
            "-m",
            "swarmrl",
            *without_option(arguments, "--gpus"),
            "--gpus",
            gpu,
            "--name",
            f"{name}-gpu{gpu}",
            "--exit-with-parent",
        ]
        children.append(subprocess.Popen(command))  # each sets CUDA_VISIBLE_DEVICES itself
    try:
        return max(child.wait() for child in children)
    except KeyboardInterrupt:
        return 130
    finally:
        stop_children(children)


def without_option(arguments: list[str], *names: str) -> list[str]:
    """Drop `--name value` / `--name=value` pairs for the given option names."""
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument in names:
            skip = True
        elif not any(argument.startswith(f"{n}=") for n in names):
            kept.append(argument)
    return kept
