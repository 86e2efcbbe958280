"""`swarmrl ledger verify` and `swarmrl ledger export`, on written chains and on a real run that is
killed with SIGKILL and resumed."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swarmrl.cli import main
from swarmrl.trainer.contributions import CHAIN_FILE, PUBLIC_FILE, ContributionLedger, verify
from tests.conftest import start_trainer, start_worker, swarmrl
from tests.test_contributions import lines, write_chain


def test_an_intact_chain_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_chain(tmp_path)
    assert main(["ledger", "verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{tmp_path / CHAIN_FILE}: 6 lines, 2 seals, signed with Ed25519 key")
    assert out[1] == "ok: the chain is intact and signed through line 6"


def test_a_removed_line_fails_verify_and_names_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_chain(tmp_path)
    chain = lines(tmp_path)
    del chain[1]
    (tmp_path / CHAIN_FILE).write_bytes(b"".join(chain))
    assert main(["ledger", "verify", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "BROKEN" in err and "  line 2 (seq 3): does not follow line 1" in err


def test_seals_are_checked_against_a_published_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whoever rewrites a folder can sign it with a key of their own: the published one tells."""
    for name in ("run", "other"):
        (tmp_path / name).mkdir()
    write_chain(tmp_path / "run")
    ContributionLedger(tmp_path / "other").close()  # another trainer's key pair
    published = tmp_path / "other" / PUBLIC_FILE
    assert main(["ledger", "verify", str(tmp_path / "run"), "--public-key", str(published)]) == 1
    assert "line 3: seal signature does not verify" in capsys.readouterr().err
    own = tmp_path / "run" / PUBLIC_FILE
    assert main(["ledger", "verify", str(tmp_path / "run"), "--public-key", str(own)]) == 0


def test_a_folder_without_a_chain_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["ledger", "verify", str(tmp_path)]) == 2
    assert "cannot read the contribution ledger" in capsys.readouterr().err


def test_export_csv_gives_per_worker_totals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_chain(tmp_path)
    assert main(["ledger", "export", str(tmp_path)]) == 0
    rows = {row["worker"]: row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert sorted(rows) == ["alice", "mallory"]
    alice = rows["alice"]
    assert (alice["credited_samples"], alice["accepted_leases"], alice["reward_sum"]) == (
        "7",
        "2",
        "3.0",
    )
    assert rows["mallory"]["rejected_samples"] == "4" and rows["mallory"]["credited_samples"] == "0"


def test_export_json_counts_only_signed_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_chain(tmp_path)
    again = ContributionLedger(tmp_path)  # a line after the last seal: not signed yet
    again.record("accepted", "alice", lease="L4", samples=4, reward_sum=4.0)
    again.close()
    out = tmp_path / "totals.json"
    assert main(["ledger", "export", str(tmp_path), "--format", "json", "--out", str(out)]) == 0
    assert "the last 1 lines are chained but not signed yet" in capsys.readouterr().err
    document = json.loads(out.read_text())
    assert document["signed_through"] == 6 and document["ledger_key"] == verify(tmp_path).key
    alice = next(row for row in document["workers"] if row["worker"] == "alice")
    assert alice["accepted_samples"] == 8  # not 12


def test_export_refuses_a_broken_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_chain(tmp_path)
    chain = lines(tmp_path)
    chain[0] = chain[0].replace(b'"samples":4', b'"samples":400')
    (tmp_path / CHAIN_FILE).write_bytes(b"".join(chain))
    assert main(["ledger", "export", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "does not follow line 1" in captured.err


def chain_entries(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / CHAIN_FILE).read_bytes().splitlines()]


@pytest.mark.e2e
def test_the_chain_survives_kill_9_and_resume(model_path: str, tmp_path: Path) -> None:
    """kill -9 a real `swarmrl train` after its first step; `--resume` continues the chain (same
    key, the lines from before kept) and the chain verifies; export sums both processes."""
    folder = tmp_path / "chain"
    trainer, endpoint = start_trainer(tmp_path, "chain", 2, "--checkpoint.every_steps", "1")
    worker = start_worker(tmp_path, endpoint, "w1")
    resumed = None
    try:
        deadline = time.monotonic() + 300
        while not (folder / "checkpoints" / "step_1").is_dir():
            assert time.monotonic() < deadline and trainer.poll() is None, "no step 1"
            time.sleep(0.2)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        before = (folder / CHAIN_FILE).read_bytes()
        key = (folder / PUBLIC_FILE).read_bytes()
        resumed = swarmrl("train", "--resume", str(folder), log=tmp_path / "resume-console.log")
        assert resumed.wait(timeout=600) == 0, (tmp_path / "resume-console.log").read_text()[-3000:]
    finally:
        for process in (trainer, worker, resumed):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    after = (folder / CHAIN_FILE).read_bytes()
    assert after.startswith(before[: before.rfind(b"\n") + 1])  # a torn last line may go
    assert (folder / PUBLIC_FILE).read_bytes() == key
    result = verify(folder)
    assert result.ok, result.problems
    assert result.signed_through == result.lines > len(before.splitlines())
    entries = chain_entries(folder)
    seals = [e["step"] for e in entries if e["kind"] == "seal"]
    assert 1 in seals and seals[-1] == 2
    command = [sys.executable, "-m", "swarmrl", "ledger"]
    checked = subprocess.run([*command, "verify", str(folder)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    exported = subprocess.run(
        [*command, "export", str(folder), "--format", "json"], capture_output=True, text=True
    )
    totals = {row["worker"]: row for row in json.loads(exported.stdout)["workers"]}
    # workers.json holds only the resumed process's counts; the chain holds both processes'.
    since = json.loads((folder / "workers.json").read_text())["workers"]["w1"]["samples"]
    kept = len(before[: before.rfind(b"\n") + 1].splitlines())
    earlier = sum(e["samples"] for e in entries[:kept] if e["kind"] == "accepted")
    assert earlier > 0 and totals["w1"]["accepted_samples"] == earlier + since
