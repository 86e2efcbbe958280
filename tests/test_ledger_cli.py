"""`swarmrl ledger verify` and `swarmrl ledger export`, on written chains; and the check that a
real run killed with SIGKILL and resumed continued its chain (run by test_faults' killed-trainer
test, which kills and resumes a trainer anyway)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from swarmrl.cli import main
from swarmrl.trainer.contributions import CHAIN_FILE, PUBLIC_FILE, ContributionLedger, verify
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


def assert_chain_survived(folder: Path, before: bytes, key: bytes, final_step: int) -> None:
    """After a kill -9 and a `--resume` to `final_step` (test_faults' killed-trainer test):
    the resumed process continued the chain (same key, the lines from before kept) and the
    chain verifies, through the CLI too; export sums both processes' accepted samples."""
    after = (folder / CHAIN_FILE).read_bytes()
    kept_bytes = before[: before.rfind(b"\n") + 1]  # a torn last line may go
    assert after.startswith(kept_bytes)
    assert (folder / PUBLIC_FILE).read_bytes() == key
    result = verify(folder)
    assert result.ok, result.problems
    assert result.signed_through == result.lines > len(before.splitlines())
    entries = chain_entries(folder)
    seals = [e["step"] for e in entries if e["kind"] == "seal"]
    assert seals[-1] == final_step and len(set(seals)) > 1, seals
    command = [sys.executable, "-m", "swarmrl", "ledger"]
    checked = subprocess.run([*command, "verify", str(folder)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    exported = subprocess.run(
        [*command, "export", str(folder), "--format", "json"], capture_output=True, text=True
    )
    totals = {row["worker"]: row for row in json.loads(exported.stdout)["workers"]}
    # workers.json holds only the resumed process's counts; the chain holds both processes'.
    resumed = json.loads((folder / "workers.json").read_text())["workers"]
    kept = len(kept_bytes.splitlines())
    for worker, counts in resumed.items():
        earlier = sum(
            e["samples"]
            for e in entries[:kept]
            if e["kind"] == "accepted" and e["worker"] == worker
        )
        assert totals[worker]["accepted_samples"] == earlier + counts["samples"], worker
    assert any(e["kind"] == "accepted" for e in entries[:kept])
