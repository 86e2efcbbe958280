"""Tests for swarmrl.trainer.ledger (counts, quarantine, workers.json), its progress summary and
the `swarmrl status` command that prints it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from swarmrl.base.config import SwarmConfig
from swarmrl.cli import main
from swarmrl.trainer.ledger import (
    Ledger,
    format_table,
    newest_run,
    read_ledger,
    write_ledger,
)
from swarmrl.trainer.progress import ledger_summary, worker_summary

RULE = SwarmConfig(quarantine_rejections=10, quarantine_fraction=0.5)


def test_faults_beyond_the_threshold_and_fraction_quarantine_a_worker() -> None:
    ledger = Ledger(RULE)
    cheat = ledger.join("cheat", b"cheat", now=0.0)
    ledger.accept(cheat, 4)
    assert not ledger.reject(cheat, "text_mismatch", 8)  # 8 faults: not more than 10
    assert ledger.reject(cheat, "duplicate", 4)  # 12 > 10, and 12 > 0.5 * (4 + 12)
    assert cheat.quarantined
    assert not ledger.reject(cheat, "duplicate")  # already quarantined: reported once
    assert cheat.reasons == {"text_mismatch": 1, "duplicate": 2}
    assert (cheat.rejected, cheat.faults, cheat.accepted) == (13, 13, 4)


def test_a_worker_that_mostly_delivers_is_not_quarantined_for_a_few_faults() -> None:
    ledger = Ledger(RULE)
    busy = ledger.join("busy", b"busy", now=0.0)
    ledger.accept(busy, 100)
    for _ in range(30):
        assert not ledger.reject(busy, "logprob_mismatch")  # 30 > 10 but 30 < 0.5 * 130
    assert not busy.quarantined


def test_bad_luck_never_quarantines() -> None:
    ledger = Ledger(RULE)
    slow = ledger.join("slow", b"slow", now=0.0)
    for reason in ("stale_version", "lease_expired", "unknown_lease", "too_many_leases"):
        assert not ledger.reject(slow, reason, 50)
    assert slow.rejected == 200 and slow.faults == 0 and not slow.quarantined


def test_a_returning_connection_keeps_its_record_a_new_one_under_its_name_does_not() -> None:
    ledger = Ledger(SwarmConfig(quarantine_rejections=0, quarantine_fraction=0.0))
    first = ledger.join("w", b"conn-1", now=1.0, address="10.0.0.7")
    assert ledger.reject(first, "invalid")
    ledger.leave(first)
    again = ledger.join("w", b"conn-1", now=5.0, address="10.0.0.7")
    assert again is first and again.connected and again.quarantined and again.last_seen == 5.0
    other = ledger.join("w", b"conn-2", now=6.0, address="10.0.0.8")
    assert other.worker_id.startswith("w-") and not other.quarantined and not other.suspect


def test_quarantine_follows_the_address_or_the_key_never_the_name() -> None:
    ledger = Ledger(SwarmConfig(quarantine_rejections=10, quarantine_fraction=0.5))
    cheat = ledger.join("mallory", b"c1", now=0.0, address="10.0.0.9")
    ledger.reject(cheat, "text_mismatch", 11)
    assert cheat.quarantined
    # The next connection from that address starts suspect: its first fault quarantines it.
    back = ledger.join("anyone", b"c2", now=1.0, address="10.0.0.9")
    assert back.suspect and not back.quarantined
    assert ledger.reject(back, "malformed")
    # In a closed swarm the key carries it.
    keyed = ledger.join("k", b"c3", now=2.0, key="KEY")
    ledger.reject(keyed, "duplicate", 11)
    assert ledger.key_quarantined("KEY") and not ledger.key_quarantined("OTHER")


def test_table_reports_throughput_and_wall_clock_last_seen() -> None:
    ledger = Ledger(RULE)
    worker = ledger.join("w", b"w", now=100.0)
    worker.last_seen = 120.0
    ledger.accept(worker, 40)
    ledger.reject(worker, "stale_version", 8)
    before = time.time()
    row = ledger.table(now=130.0)["w"]
    assert row["samples"] == 40 and row["rejected"] == 8 and row["faults"] == 0
    assert row["samples_per_s"] == pytest.approx(2.0)  # 40 samples while seen for 20 s
    assert before - 10.0 <= row["last_seen"] <= time.time() - 10.0
    assert row["reasons"] == {"stale_version": 1}
    assert row["connected"] and not row["quarantined"]


def table() -> dict:
    ledger = Ledger(SwarmConfig(quarantine_rejections=2, quarantine_fraction=0.5))
    honest, cheat = (
        ledger.join("worker-1", b"worker-1", now=0.0),
        ledger.join("mallory", b"mallory", now=0.0),
    )
    honest.last_seen = 10.0
    ledger.accept(honest, 30)
    ledger.reject(cheat, "logprob_mismatch", 8)
    ledger.reject(cheat, "duplicate")
    return ledger.table(now=10.0)


def test_format_table_has_one_row_per_worker() -> None:
    lines = format_table(table(), time.time()).splitlines()
    assert lines[0].split() == [
        "worker",
        "status",
        "accepted",
        "rejected",
        "samples/s",
        "last",
        "seen",
        "reasons",
    ]
    assert lines[1].split()[:5] == ["mallory", "quarantined", "0", "9", "0.00"]
    assert lines[1].endswith("  logprob_mismatch 1, duplicate 1")
    assert lines[2].split()[:5] == ["worker-1", "connected", "30", "0", "3.00"]
    assert lines[2].endswith("-")


def test_ledger_file_is_written_whole_and_read_back(tmp_path: Path) -> None:
    write_ledger(tmp_path, table())
    assert [p.name for p in tmp_path.iterdir()] == ["workers.json"]
    data = read_ledger(tmp_path)
    assert set(data["workers"]) == {"worker-1", "mallory"}
    assert data["workers"]["mallory"]["quarantined"] is True


def test_reading_a_missing_or_foreign_ledger_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no worker ledger"):
        read_ledger(tmp_path)
    (tmp_path / "workers.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a worker ledger"):
        read_ledger(tmp_path)


def test_newest_run_is_the_one_with_the_latest_ledger(tmp_path: Path) -> None:
    for age, name in ((100, "old"), (0, "new"), (50, "middle")):
        (tmp_path / name).mkdir()
        write_ledger(tmp_path / name, table())
        stamp = time.time() - age
        os.utime(tmp_path / name / "workers.json", (stamp, stamp))
    (tmp_path / "no-ledger").mkdir()
    assert newest_run(tmp_path) == tmp_path / "new"
    with pytest.raises(FileNotFoundError, match="no run folder"):
        newest_run(tmp_path / "no-ledger")


def test_status_prints_the_newest_run_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "arithmetic-1").mkdir(parents=True)
    write_ledger(tmp_path / "runs" / "arithmetic-1", table())
    (tmp_path / "runs" / "arithmetic-1" / "trainer.pid").write_text(str(os.getpid()))  # alive
    assert main(["status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(str(Path("runs") / "arithmetic-1") + " (running; ledger written ")
    assert out[1].startswith("worker") and {line.split()[0] for line in out[2:]} == {
        "mallory",
        "worker-1",
    }
    assert main(["status", "runs/arithmetic-1"]) == 0


def test_status_without_a_ledger_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", str(tmp_path)]) == 2
    assert "no worker ledger" in capsys.readouterr().err


def test_progress_summary_shows_share_rejections_and_quarantine() -> None:
    rows = table()
    assert worker_summary("worker-1", rows["worker-1"], 30) == "worker-1 100%"
    assert worker_summary("mallory", rows["mallory"], 30) == "mallory 0% rej 9 quarantined"
    assert worker_summary("mallory", rows["mallory"], 0) == "mallory 0% rej 9 quarantined"


def test_a_name_taken_by_a_record_gets_a_suffix() -> None:
    ledger = Ledger(RULE)
    assert ledger.join("gpu", b"1", now=0.0).worker_id == "gpu"
    assert ledger.join("gpu", b"2", now=0.0).worker_id == "gpu-1"
    assert ledger.join("gpu", b"3", now=0.0).worker_id == "gpu-2"
    assert ledger.join("", b"4", now=0.0).worker_id == "worker"
    assert ledger.join("x" * 128, b"5", now=0.0).worker_id == "x" * 100


def test_status_tells_a_finished_run_from_a_live_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_ledger(tmp_path, table(), finished=True)
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "(finished;" in out[0]
    assert {line.split()[1] for line in out[2:]} == {"quarantined", "left"}
    write_ledger(tmp_path, table())  # not finished, and no trainer process behind it
    (tmp_path / "trainer.pid").write_text("999999999")
    assert main(["status", str(tmp_path)]) == 0
    assert "(stopped without finishing;" in capsys.readouterr().out.splitlines()[0]


def test_the_progress_line_shows_the_top_connected_workers_and_counts_the_rest() -> None:
    def row(samples: int, connected: bool = True, quarantined: bool = False) -> dict:
        return {
            "samples": samples,
            "rejected": 32 * quarantined,
            "connected": connected,
            "quarantined": quarantined,
        }

    workers = {f"forger-{i}": row(0, connected=False, quarantined=True) for i in range(500)}
    workers |= {f"worker-{i}": row(10 * i) for i in range(1, 8)}
    line = ledger_summary(workers, total_samples=280)
    assert line.startswith("worker-7 25% worker-6 21% worker-5 18% worker-4 14% worker-3 11%")
    assert line.endswith("worker-2 7% +501 more (500 quarantined)")
