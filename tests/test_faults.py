"""Faults injected for real: damaged checkpoints, full disks, stopped workers, a kill -9'd trainer.

Unit tests damage checkpoint files of a tiny random model and fill the disk with RLIMIT_FSIZE
(the kernel then fails writes with EFBIG). The end-to-end tests run the CLI in subprocesses on
the real tiny model: SIGSTOP a worker past the heartbeat timeout, kill -9 the trainer mid-save
and resume it, checkpoint into a tmpfs too small for two checkpoints. The prompt accounting
behind docs/security.md's guarantee is checked from the trainer's debug log ("lease X (p1,p2)
leased to W", "accepted from W", "step N trained on p1,p2") and trainer_state.json.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swarmrl.trainer.checkpoint import (
    CheckpointError,
    CheckpointMismatch,
    checkpoints,
    load_latest,
    read_checkpoint,
    save_checkpoint,
)
from swarmrl.trainer.contributions import CHAIN_FILE, PUBLIC_FILE
from tests.conftest import start_trainer, start_worker, swarmrl, wait_for_text
from tests.test_ledger_cli import assert_chain_survived

e2e = pytest.mark.e2e


# ---- unit: a tiny random model, real files ---------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def tiny_model(seed: int, hidden: int = 32) -> tuple[Any, Any]:
    """A 1-layer llama with the real vocabulary and an AdamW that has taken one step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    return model, optimizer


def weights(model: Any) -> dict[str, Any]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def same(first: dict[str, Any], second: dict[str, Any]) -> bool:
    return first.keys() == second.keys() and all(first[k].equal(second[k]) for k in first)


def state(step: int) -> dict:
    return {"leases": {"next_index": step, "requeued": [], "attempts": {}}, "history": {}}


def two_checkpoints(folder: Path, tokenizer: Any) -> tuple[dict[str, Any], Any]:
    """step_1 and step_2 of different weights; returns step_1's weights and AdamW moment."""
    first, first_optimizer = tiny_model(1)
    save_checkpoint(folder, 1, first, tokenizer, first_optimizer.state_dict(), state(1), keep=5)
    second, second_optimizer = tiny_model(2)
    save_checkpoint(folder, 2, second, tokenizer, second_optimizer.state_dict(), state(2), keep=5)
    return weights(first), moment(first_optimizer)


def moment(optimizer: Any) -> Any:
    return optimizer.state_dict()["state"][0]["exp_avg"].clone()


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGE = {
    "model.safetensors": truncate,
    "trainer_state.json": Path.unlink,
    "optimizer.pt": lambda path: path.write_bytes(os.urandom(4096)),
}


@pytest.mark.parametrize("file", sorted(DAMAGE))
def test_damaged_checkpoint_is_named_and_the_previous_one_used(
    file: str, tmp_path: Path, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    first, first_moment = two_checkpoints(tmp_path, tokenizer)
    DAMAGE[file](tmp_path / "step_2" / file)
    model, optimizer = tiny_model(3)
    with caplog.at_level(logging.ERROR):
        restored = load_latest(tmp_path, model, optimizer)
    assert restored is not None and restored["step"] == 1
    assert same(weights(model), first)
    assert moment(optimizer).equal(first_moment)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert str(tmp_path / "step_2" / file) in errors[0], errors[0]
    # Set aside: a later resume must not pick it again, and `keep` must not count it.
    assert checkpoints(tmp_path) == [tmp_path / "step_1"]
    assert (tmp_path / "step_2.unreadable" / "config.json").is_file()


def test_nothing_is_applied_from_a_checkpoint_that_fails_late(
    tmp_path: Path, tokenizer: Any
) -> None:
    """Good weights but a garbage optimizer.pt: the model must keep its own weights."""
    saved, saved_optimizer = tiny_model(1)
    save_checkpoint(tmp_path, 1, saved, tokenizer, saved_optimizer.state_dict(), state(1), keep=2)
    (tmp_path / "step_1" / "optimizer.pt").write_bytes(b"\x80\x02garbage")
    model, optimizer = tiny_model(2)
    before = weights(model)
    assert load_latest(tmp_path, model, optimizer) is None
    assert same(weights(model), before)


def test_checkpoint_of_another_model_stops_the_resume(tmp_path: Path, tokenizer: Any) -> None:
    """A config mismatch is not damage: no silent fallback, nothing moved aside."""
    saved, saved_optimizer = tiny_model(1, hidden=32)
    save_checkpoint(tmp_path, 1, saved, tokenizer, saved_optimizer.state_dict(), state(1), keep=2)
    model, optimizer = tiny_model(2, hidden=16)
    with pytest.raises(CheckpointMismatch, match="does not fit this model"):
        load_latest(tmp_path, model, optimizer)
    assert checkpoints(tmp_path) == [tmp_path / "step_1"]


@pytest.fixture
def file_size_limit() -> Iterator[Any]:
    """Set RLIMIT_FSIZE for this process (writes past it fail with EFBIG); restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN  # Python ignores it: EFBIG

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("failing", ["model.safetensors", "optimizer.pt"])
def test_full_disk_while_saving_keeps_the_previous_checkpoint(
    failing: str, tmp_path: Path, tokenizer: Any, file_size_limit: Any
) -> None:
    model, optimizer = tiny_model(1)
    save_checkpoint(tmp_path, 1, model, tokenizer, optimizer.state_dict(), state(1), keep=1)
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "step_1").iterdir()}
    others = max(size for name, size in sizes.items() if name != "optimizer.pt")
    assert sizes["model.safetensors"] < sizes["optimizer.pt"] and others < sizes["optimizer.pt"]
    limit = sizes[failing] // 2 if failing == "model.safetensors" else others + 1
    expected = weights(model)
    later, later_optimizer = tiny_model(2)
    later_state = later_optimizer.state_dict()
    file_size_limit(limit)
    for step in (2, 1):  # a new step, and the same step again (it must not be removed first)
        with pytest.raises(CheckpointError) as caught:
            save_checkpoint(tmp_path, step, later, tokenizer, later_state, state(step), keep=1)
        message = str(caught.value)
        assert f"step_{step}" in message and "File too large" in message, message
        assert (failing.split(".")[0]) in message, message
    file_size_limit(resource.RLIM_INFINITY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]  # no staging left behind
    fresh, fresh_optimizer = tiny_model(3)
    assert load_latest(tmp_path, fresh, fresh_optimizer)["step"] == 1
    assert same(weights(fresh), expected)


def test_leftovers_of_a_killed_save_are_cleared(tmp_path: Path, tokenizer: Any) -> None:
    """A half-written staging folder goes; a checkpoint a re-save had just moved out of the way
    (killed between its two renames) comes back."""
    model, optimizer = tiny_model(1)
    save_checkpoint(tmp_path, 2, model, tokenizer, optimizer.state_dict(), state(2), keep=2)
    swapped = tmp_path / ".step_2.replaced.xyz"
    swapped.mkdir()
    (tmp_path / "step_2").rename(swapped / "step_2")
    half = tmp_path / ".step_3.abc123"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    save_checkpoint(tmp_path, 4, model, tokenizer, optimizer.state_dict(), state(4), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_4"]
    assert read_checkpoint(tmp_path / "step_2")[0]["step"] == 2


# ---- end to end: the CLI in subprocesses, the real tiny model ---------------------------------


def metrics(folder: Path) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for line in lines if (r := json.loads(line))["kind"] == "train"]


def trained(log: str) -> dict[int, list[int]]:
    """{step: prompt indices} from the trainer's "step N trained on p1,p2" debug lines."""
    found: dict[int, list[int]] = {}
    for step, prompts in re.findall(r"step (\d+) trained on (\S+)", log):
        assert int(step) not in found, f"step {step} trained twice in one process"
        found[int(step)] = indices(prompts)
    return found


def indices(prompts: str) -> list[int]:
    return [int(p[1:]) for p in prompts.split(",")]


def leased(log: str, worker: str = r"\S+") -> list[int]:
    return [
        i for p in re.findall(rf"lease \S+ \((\S+)\) leased to {worker}\n", log) for i in indices(p)
    ]


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@e2e
def test_stopped_worker_comes_back_and_catches_up_with_deltas(
    model_path: str, tmp_path: Path
) -> None:
    """SIGSTOP a worker past the heartbeat timeout while the swarm trains on, then SIGCONT:
    the trainer dropped it and leased its prompts again; the same process reconnects by
    itself and replays the deltas it missed (same run: no keyframe needed)."""
    folder = tmp_path / "pause"
    trainer, endpoint = start_trainer(
        tmp_path,
        "pause",
        30,
        "--logging.level",
        "debug",
        "--trainer.optimizer",
        "demo",
        "--checkpoint.every_steps",
        "0",
    )
    helper = start_worker(tmp_path, endpoint, "helper")
    victim = start_worker(tmp_path, endpoint, "victim")
    trainer_log, victim_log = folder / "trainer.log", tmp_path / "victim.log"
    try:
        wait_for_text(trainer_log, "leased to victim", 180, trainer)
        victim.send_signal(signal.SIGSTOP)
        wait_for_text(trainer_log, "victim left: silent", 30, trainer)
        text = trainer_log.read_text()
        steps_before = len(re.findall(r" step \d+ reward", text))
        wait_for_text(trainer_log, f" step {steps_before + 1} reward", 300, trainer)
        before = victim_log.read_text()
        victim.send_signal(signal.SIGCONT)
        dropped_at = text.index("victim left: silent")
        deadline = time.monotonic() + 300
        while True:  # accepted again after joining a second time
            log = trainer_log.read_text()
            rejoined = log.find("victim joined", dropped_at)
            if rejoined >= 0 and "accepted from victim" in log[rejoined:]:
                break
            assert time.monotonic() < deadline, log[-3000:]
            assert trainer.poll() is None, log[-3000:]
            time.sleep(0.5)
        assert victim.poll() is None  # the same process came back
    finally:
        trainer.kill()  # a clean stop is test_e2e's business; this saves a step and a save
        victim.send_signal(signal.SIGCONT)
        stop(helper, victim)
    log, after = trainer_log.read_text(), victim_log.read_text()[len(before) :]
    # What the victim held when it froze went back in the queue and was leased again.
    given = dict(re.findall(r"lease (\S+) \((\S+)\) leased to victim\n", log[:dropped_at]))
    returned = re.findall(r"lease (\S+) \(\S+\) accepted from victim", log[:dropped_at])
    held = [
        i for lease, prompts in given.items() if lease not in returned for i in indices(prompts)
    ]
    assert f"victim left: silent for more than 4s; {len(held)} leased prompts" in log
    assert set(held) <= set(leased(log[dropped_at:])), held
    # The worker noticed, reconnected to the same run and replayed the missed deltas.
    run_ids = set(re.findall(r"connected to \S+ as victim \(run (\w+)", before + after))
    assert len(run_ids) == 1 and "connected to" in after, after[-3000:]
    versions_before = [int(v) for v in re.findall(r"weights now at version (\d+)", before)]
    updates_after = re.findall(r"weights now at version (\d+) \((\w+),", after)
    assert updates_after, after[-3000:]
    assert int(updates_after[0][0]) > max(versions_before, default=0)
    assert {codec for _, codec in updates_after} == {"demo"}, updates_after


def owed_prompts(checkpoint: Path) -> tuple[int, list[int]]:
    leases = json.loads((checkpoint / "trainer_state.json").read_text())["leases"]
    return leases["next_index"], [int(i) for i in leases["requeued"]]


@e2e
def test_killed_trainer_resumes_without_losing_or_repeating_a_prompt(
    model_path: str, tmp_path: Path
) -> None:
    """kill -9 the trainer in the middle of writing a checkpoint; `swarmrl train --resume`
    continues from the last complete one while the same two workers reconnect by themselves
    (new run: a keyframe), and continues the contribution chain. Then a damaged newest
    checkpoint makes --resume use the previous."""
    folder = tmp_path / "crash"
    trainer, endpoint = start_trainer(
        tmp_path,
        "crash",
        50,
        "--logging.level",
        "debug",
        "--trainer.optimizer",
        "demo",
        "--checkpoint.every_steps",
        "1",
        "--checkpoint.keep",
        "2",
    )
    workers = [start_worker(tmp_path, endpoint, name) for name in ("w1", "w2")]
    trainer_log, checkpoint_dir = folder / "trainer.log", folder / "checkpoints"
    resumed: subprocess.Popen | None = None
    try:
        wait_for_text(trainer_log, "checkpoint saved: ", 300, trainer)
        deadline = time.monotonic() + 300
        while not any(checkpoint_dir.glob(".step_2.*")):  # the second save has begun
            assert time.monotonic() < deadline and trainer.poll() is None
            time.sleep(0.02)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        crashed_log = trainer_log.read_text()
        chain, key = (folder / CHAIN_FILE).read_bytes(), (folder / PUBLIC_FILE).read_bytes()
        unfinished = sorted(checkpoint_dir.glob(".step_*"))  # unless the save just made it
        last = checkpoints(checkpoint_dir)[-1]
        step = int(last.name[5:])
        next_index, owed = owed_prompts(last)

        resumed = swarmrl(
            "train",
            "--resume",
            str(folder),
            "--trainer.max_steps",
            str(step + 1),
            log=tmp_path / "resume-console.log",
        )
        assert resumed.wait(timeout=600) == 0, (tmp_path / "resume-console.log").read_text()[-3000:]
        assert all(w.poll() is None for w in workers)  # nobody restarted the workers
    finally:
        if trainer.poll() is None:
            trainer.kill()
        stop(*workers, *([resumed] if resumed else []))
    log = trainer_log.read_text()
    assert log.startswith(crashed_log)
    after = log[len(crashed_log) :]
    assert f"resumed from {last} (step {step})" in after
    for leftover in unfinished:
        assert f"removed {leftover}, left by an interrupted checkpoint save" in after
    assert not any(checkpoint_dir.glob(".step_*"))
    new_run = re.findall(r"listening on \S+ \(run (\w+)\)", after)[0]

    # Each worker reconnected to the new run and was sent a keyframe of the resumed weights.
    for name in ("w1", "w2"):
        text = (tmp_path / f"{name}.log").read_text()
        assert re.search(r"weights now at version \d+ \(demo,", text), name  # deltas before
        rejoined = text.index(f"(run {new_run},")
        assert f"weights now at version {step} (full," in text[rejoined:], text[-3000:]

    # The guarantee (docs/security.md, Faults). In the lineage of the final weights, steps
    # 1..step come from before the crash and the rest from after the resume.
    before = {s: p for s, p in trained(crashed_log).items() if s <= step}
    since = trained(after)
    assert sorted(before) == list(range(1, step + 1))
    assert sorted(since) == [step + 1]
    lineage = [i for prompts in [*before.values(), *since.values()] for i in prompts]
    assert len(lineage) == len(set(lineage)), f"a prompt was trained twice: {lineage}"
    # At the checkpoint every prompt leased so far was trained, owed, or had no reward spread.
    trained_before = {i for prompts in before.values() for i in prompts}
    assert owed, "workers were busy: some prompts must have been out at the checkpoint"
    assert len(owed) == len(set(owed)) and not trained_before & set(owed)
    no_spread = {
        i
        for prompts, useful, total in re.findall(
            r"\((\S+)\) accepted from \S+: \d+ samples, (\d+)/(\d+) groups", crashed_log
        )
        if useful != total
        for i in indices(prompts)
    }
    missing = set(range(next_index)) - trained_before - set(owed)
    assert missing <= no_spread, f"prompts lost at the checkpoint: {missing - no_spread}"
    # After the resume, the owed prompts are leased again first and nothing else from before.
    leased_after = leased(after)
    assert leased_after[: len(owed)] == owed, (owed, leased_after)
    assert all(i in owed or i >= next_index for i in leased_after), (next_index, leased_after)
    assert metrics(folder) == [*trained(crashed_log), step + 1]
    assert_chain_survived(folder, chain, key, step + 1)

    # A damaged newest checkpoint: --resume names the file and uses the one before.
    newest = checkpoints(checkpoint_dir)[-1]
    assert newest.name == f"step_{step + 1}"
    truncate(newest / "model.safetensors")
    again = swarmrl(
        "train",
        "--resume",
        str(folder),
        "--trainer.max_steps",
        str(step),
        log=tmp_path / "damaged-console.log",
    )
    assert again.wait(timeout=300) == 0, (tmp_path / "damaged-console.log").read_text()[-3000:]
    log = trainer_log.read_text()[len(crashed_log) + len(after) :]
    assert f"{newest} is unreadable: {newest / 'model.safetensors'}" in log, log[-3000:]
    assert f"resumed from {last} (step {step})" in log
    assert (checkpoint_dir / f"{newest.name}.unreadable").is_dir()


@pytest.fixture
def tmpfs() -> Iterator[Any]:
    """mount(folder, size) mounts a tmpfs of `size` bytes there (created); unmounted after."""
    mounted: list[Path] = []

    def mount(folder: Path, size: int) -> None:
        folder.mkdir(parents=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"CI must be able to mount a tmpfs: {done.stderr}")
            pytest.skip(f"cannot mount a tmpfs here (not root?): {done.stderr.strip()}")
        mounted.append(folder)

    if shutil.which("mount") is None and not os.environ.get("CI"):
        pytest.skip("no mount command")
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@e2e
def test_full_disk_keeps_the_previous_checkpoint_and_training_goes_on(
    model_path: str, tmp_path: Path, tmpfs: Any
) -> None:
    """Checkpoints on a tmpfs with room for one: step_1 is written, step_2 runs out of space
    (ENOSPC, for real). The trainer names the file, keeps step_1, trains on and stops cleanly."""
    model = Path(model_path)
    # One checkpoint of the default recipe: the weights + the demo optimizer's momentum.
    size = 2 * (model / "model.safetensors").stat().st_size
    size += (model / "tokenizer.json").stat().st_size
    checkpoint_dir = tmp_path / "full" / "checkpoints"
    tmpfs(checkpoint_dir, int(size * 1.4))
    trainer, endpoint = start_trainer(
        tmp_path, "full", 2, "--checkpoint.every_steps", "1", "--checkpoint.keep", "2"
    )
    worker = start_worker(tmp_path, endpoint, "w")
    try:
        assert trainer.wait(timeout=600) == 0, (tmp_path / "full-console.log").read_text()[-3000:]
    finally:
        stop(trainer, worker)
    log = (tmp_path / "full" / "trainer.log").read_text()
    assert f"checkpoint saved: {checkpoint_dir / 'step_1'}" in log
    failures = re.findall(r"ERROR +could not write checkpoint (.*)", log)
    # The save after step 2 failed, and so did the final one (the same step) after it.
    assert len(failures) == 2, log[-3000:]
    for failure in failures:
        assert failure.startswith(f"{checkpoint_dir / 'step_2'}: "), failure
        assert re.search(
            r": (model weights|optimizer\.pt)\b.* \(\d+ MB left on that disk\)", failure
        )
        assert "No space left on device" in failure, failure
        assert failure.endswith(f"the newest checkpoint is still {checkpoint_dir / 'step_1'}")
    assert " step 2 reward" in log and metrics(tmp_path / "full") == [1, 2]
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["step_1"]  # no staging left
    assert read_checkpoint(checkpoint_dir / "step_1")[0]["step"] == 1
