"""End to end over real ZeroMQ on loopback with the real tiny model: the CLI in subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarmrl.protocol.auth import load_key_pair
from tests.conftest import E2E_RECIPE, FAST_RUN, start_trainer, start_worker, swarmrl, wait_for_text

pytestmark = pytest.mark.e2e


def metrics(folder: Path, kind: str) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [record for line in lines if (record := json.loads(line))["kind"] == kind]


def accepted_samples(folder: Path) -> dict[str, int]:
    """Accepted samples per worker, from the run's ledger (workers.json)."""
    workers = json.loads((folder / "workers.json").read_text())["workers"]
    return {name: worker["samples"] for name, worker in workers.items()}


def test_killed_worker_loses_nothing(model_path: str, tmp_path: Path) -> None:
    """kill -9 a worker mid-lease: its prompts are leased again and trained on."""
    folder = tmp_path / "kill"
    trainer, endpoint = start_trainer(tmp_path, "kill", 2, "--logging.level", "debug")
    victim = start_worker(tmp_path, endpoint, "victim", "--slowdown", "50")
    try:
        trainer_log = folder / "trainer.log"
        wait_for_text(trainer_log, "victim joined", 120, trainer)
        wait_for_text(trainer_log, "leased to victim", 120, trainer)
        leased = re.search(r"lease (\S+) \((\S+)\) leased to victim", trainer_log.read_text())
        assert leased is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        wait_for_text(trainer_log, "victim left: silent", 60, trainer)
        helper = start_worker(tmp_path, endpoint, "helper")
        try:
            assert trainer.wait(timeout=600) == 0, (tmp_path / "kill-console.log").read_text()[
                -3000:
            ]
        finally:
            helper.send_signal(signal.SIGTERM)
            helper.wait(timeout=30)
    finally:
        for process in (trainer, victim):
            if process.poll() is None:
                process.kill()
    text = trainer_log.read_text()
    # Every prompt the victim held was leased again and came back accepted from the helper.
    for prompt in leased.group(2).split(","):
        assert re.search(rf"lease \S+ \(\S*\b{prompt}\b\S*\) accepted from helper", text), prompt
    assert accepted_samples(folder).get("victim", 0) == 0


def most_leases_held_at_once(trainer_log: str, worker: str) -> int:
    held, most = set(), 0
    for lease, event in re.findall(
        rf"lease (\S+) \(\S*\) (leased to|accepted from) {worker}\b", trainer_log
    ):
        if event == "leased to":
            held.add(lease)
        else:
            held.discard(lease)
        most = max(most, len(held))
    return most


def test_slow_worker_contributes_fewer_samples(model_path: str, tmp_path: Path) -> None:
    """A worker 8x slower is not waited for: it simply contributes fewer samples.

    The slow worker starts once the fast one has delivered a lease. Started together, which one
    finishes loading first is luck on 2 busy cores, and over 4 steps the first leases decide.
    Staleness 4 leaves room (4 steps' prompts) for a proven worker to ask ahead."""
    folder = tmp_path / "mixed"
    trainer, endpoint = start_trainer(
        tmp_path, "mixed", 4, "--trainer.max_staleness", "4", "--logging.level", "debug"
    )
    workers = [start_worker(tmp_path, endpoint, "fast", "--slowdown", "1")]
    try:
        wait_for_text(folder / "trainer.log", "accepted from fast", 300, trainer)
        workers.append(start_worker(tmp_path, endpoint, "slow", "--slowdown", "8"))
        assert trainer.wait(timeout=600) == 0, (tmp_path / "mixed-console.log").read_text()[-3000:]
    finally:
        for process in workers:
            process.send_signal(signal.SIGTERM)
        for process in [*workers, trainer]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    trainer_log = (folder / "trainer.log").read_text()
    contributed = accepted_samples(folder)
    assert contributed.get("fast", 0) > 0
    assert contributed.get("slow", 0) < contributed["fast"] / 2, contributed
    # Pipelined: the next lease was already out while the engine generated the last one.
    assert most_leases_held_at_once(trainer_log, "fast") == 2
    assert [s["step"] for s in metrics(folder, "train")] == [1, 2, 3, 4]


def test_run_trains_stops_on_ctrl_c_resumes_and_evaluates(model_path: str, tmp_path: Path) -> None:
    """`swarmrl run` trains through a real, closed (CURVE) swarm of two local workers; one
    Ctrl-C stops trainer and workers cleanly; --resume continues, with the same trainer key, and
    evaluates; `swarmrl eval` reads the result. (One test: each run costs three model loads.)"""
    folder = tmp_path / "r"
    log = tmp_path / "run.log"
    allow = tmp_path / "allowed.txt"
    allow.write_text("# only the local workers\n")
    process = swarmrl(
        "run",
        E2E_RECIPE,
        *FAST_RUN,
        "--allow-keys",
        str(allow),
        "--trainer.max_steps",
        "50",
        "--checkpoint.every_steps",
        "1",
        "--eval.before=true",
        "--eval.heldout_size",
        "8",
        "--logging.run_dir",
        str(tmp_path),
        "--logging.run_name",
        "r",
        log=log,
        new_session=True,
    )
    try:
        wait_for_text(folder / "trainer.log", "step 1 ", 300, process)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # no worker outlived the trainer
        os.killpg(process.pid, 0)
    saved = sorted(int(p.name[5:]) for p in (folder / "checkpoints").glob("step_*"))
    assert saved and saved[-1] >= 1
    last = saved[-1]
    key = load_key_pair(folder / "trainer.key_secret")  # generated into the run folder

    resumed_log = tmp_path / "resume.log"
    resumed = swarmrl(
        "run",
        "--resume",
        str(folder),
        "--trainer.max_steps",
        str(last + 1),
        "--eval.after=true",
        log=resumed_log,
    )
    assert resumed.wait(timeout=600) == 0, resumed_log.read_text()[-3000:]
    trainer_log = (folder / "trainer.log").read_text()
    assert f"(step {last})" in trainer_log
    assert trainer_log.count("closed swarm (CURVE): 0 worker keys allowed") == 2
    assert load_key_pair(folder / "trainer.key_secret") == key  # the run's key, reused
    steps = metrics(folder, "train")
    assert [s["step"] for s in steps] == list(range(1, last + 2))
    assert all(s["loss"] == s["loss"] and s["grad_norm"] > 0 for s in steps)
    # Both workers' samples reached the trainer (the contribution chain spans both processes),
    # and the worker logs carry their role tag.
    chain = [json.loads(line) for line in (folder / "contributions.jsonl").read_text().split()]
    contributed = {e["worker"] for e in chain if e["kind"] == "accepted" and e["samples"] > 0}
    assert contributed == {"worker-1", "worker-2"}
    worker_logs = (folder / "worker-1.log").read_text() + (folder / "worker-2.log").read_text()
    assert " worker-1 " in worker_logs
    # Weights moved to the workers after each step, checkpoints are complete HF folders.
    assert "weights now at version 1" in worker_logs
    final = folder / "checkpoints" / f"step_{last + 1}"
    assert (final / "config.json").is_file() and (final / "trainer_state.json").is_file()
    assert [e["step"] for e in metrics(folder, "eval")] == [0, last + 1]
    output = resumed_log.read_text()
    assert "held-out greedy accuracy" in output and f"run folder {folder}" in output
    assert any((folder / "tensorboard").iterdir())

    evaluated = subprocess.run(
        [sys.executable, "-m", "swarmrl", "eval", str(final), "--eval.heldout_size", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert re.search(r"held-out greedy accuracy: [01]\.\d{3} on 4 prompts", evaluated.stdout)


def test_tool_recipe_trains_on_verified_episodes(tmp_path: Path) -> None:
    """`swarmrl run recipes/calculator.toml`: two workers run calculator episodes, the trainer
    re-runs every tool call before it trains on them, and the greedy evaluation is multi-turn.
    The recipe gets TRL's length reward at weight 0.1, as the arithmetic one does in E2E_RECIPE:
    the untrained model answers 1 in 20 right, so a step would wait for a reward spread."""
    calculator = Path(__file__).parent.parent / "recipes" / "calculator.toml"
    recipe = tmp_path / "calculator.toml"
    recipe.write_text(
        calculator.read_text()
        + '\n[[rewards]]\nfunction = "tests.trl_rewards:reward_len"\nweight = 0.1\n'
    )
    log = tmp_path / "run.log"
    process = swarmrl(
        "run",
        str(recipe),
        *FAST_RUN,
        "--sampling.max_completion_length",
        "64",  # a call (35 tokens), its result (14), the answer: 48 leaves no room to answer
        "--trainer.max_steps",
        "2",
        "--eval.after=true",
        "--eval.heldout_size",
        "4",
        "--logging.run_dir",
        str(tmp_path),
        "--logging.run_name",
        "tools",
        log=log,
    )
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    folder = tmp_path / "tools"
    steps = metrics(folder, "train")
    assert [s["step"] for s in steps] == [1, 2]
    # Episodes: the environment wrote part of every step's tokens, kept out of the loss.
    assert all(0 < s["environment_token_fraction"] < 1 and s["model_turns"] > 1 for s in steps)
    assert all(0 < s["episode_check_seconds"] < s["step_seconds"] for s in steps)
    (final,) = metrics(folder, "eval")
    assert final["model_turns"] > 1
    workers = json.loads((folder / "workers.json").read_text())["workers"]
    assert set(workers) == {"worker-1", "worker-2"}
    assert all(w["samples"] > 0 and w["faults"] == 0 for w in workers.values())
