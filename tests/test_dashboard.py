"""The dashboard's HTTP side (trainer/dashboard.py) with urllib: its JSON, the token, read-only.
The page itself runs in a real browser in tests/test_dashboard_browser.py."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swarmrl.cli import main
from swarmrl.trainer.dashboard import Dashboard, is_loopback
from swarmrl.trainer.ledger import write_ledger


def worker(samples: int, rejected: int = 0, connected: bool = True, **more: Any) -> dict:
    return {
        "samples": samples,
        "unscored": 0,
        "rejected": rejected,
        "faults": rejected,
        "reasons": {"text_mismatch": rejected} if rejected else {},
        "samples_per_s": 0.5,
        "generation_seconds": 1.0,
        "last_seen": time.time(),
        "connected": connected,
        "quarantined": False,
        "proven": True,
        "backend": "hf",
        "software": "0.1",
        "key": "",
        **more,
    }


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "run-1"
    folder.mkdir()
    (folder / "config.toml").write_text("[trainer]\nmax_steps = 40\nmax_minutes = 10.0\n")
    train = {"kind": "train", "loss": 0.5, "reward_mean": float("nan"), "update_bytes": 54000}
    lines = [json.dumps({**train, "step": step, "time": 1.0}) for step in (1, 2)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"kind": "train", "st')
    table = {"alice": worker(30), "bob": worker(10), "mallory": worker(0, 24, quarantined=True)}
    write_ledger(folder, table, finished=True)
    return folder


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[Dashboard] = []

    def start(folder: Path, host: str = "127.0.0.1", **options: Any) -> Dashboard:
        started.append(Dashboard(folder, host, 0, **options).start())
        return started[-1]

    yield start
    for dashboard in started:
        dashboard.stop()


def get(dashboard: Dashboard, path: str) -> tuple[int, bytes, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{dashboard.port}{path}") as answer:
            return answer.status, answer.read(), answer.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def test_status_lists_workers_busiest_first_with_their_share(run_folder: Path, serve) -> None:
    code, body, headers = get(serve(run_folder), "/api/status")
    assert code == 200 and headers["Content-Type"] == "application/json"
    status = json.loads(body)
    assert (status["run"], status["state"], status["max_steps"]) == ("run-1", "finished", 40)
    rows = status["workers"]
    assert [row["name"] for row in rows] == ["alice", "bob", "mallory"]
    assert [row["share"] for row in rows] == [0.75, 0.25, 0.0]
    assert [row["status"] for row in rows] == ["left", "left", "quarantined"]
    assert rows[2]["reasons"] == {"text_mismatch": 24}


def test_metrics_come_in_pieces_from_an_offset(run_folder: Path, serve) -> None:
    dashboard = serve(run_folder)
    first = json.loads(get(dashboard, "/api/metrics?from=0")[1])
    assert [r["step"] for r in first["records"]] == [1, 2]  # the line being written waits
    assert first["records"][0]["reward_mean"] is None  # NaN: not JSON
    assert json.loads(get(dashboard, f"/api/metrics?from={first['next']}")[1])["records"] == []
    with (run_folder / "metrics.jsonl").open("a") as file:
        file.write('ep": 3, "time": 2.0, "loss": 0.4}\n')
    later = json.loads(get(dashboard, f"/api/metrics?from={first['next']}")[1])
    assert [(r["step"], r["loss"]) for r in later["records"]] == [(3, 0.4)]
    assert get(dashboard, "/api/metrics?from=-1")[0] == 400


def test_the_live_table_comes_from_the_trainer(run_folder: Path, serve) -> None:
    dashboard = serve(run_folder, workers=lambda: {"carol": worker(5)})
    status = json.loads(get(dashboard, "/api/status")[1])
    assert status["state"] == "running"
    assert [(row["name"], row["status"]) for row in status["workers"]] == [("carol", "connected")]


def test_a_non_loopback_dashboard_needs_its_token(run_folder: Path, serve) -> None:
    dashboard = serve(run_folder, host="0.0.0.0")
    assert dashboard.token and dashboard.url.endswith(f"/?token={dashboard.token}")
    assert get(dashboard, "/api/status")[0] == 403
    assert get(dashboard, "/api/metrics?from=0&token=wrong")[0] == 403
    assert get(dashboard, f"/api/status?token={dashboard.token}")[0] == 200
    assert get(dashboard, "/")[0] == 200  # the page and its scripts hold no run data


def test_it_serves_its_files_only_and_only_reads(run_folder: Path, serve) -> None:
    dashboard = serve(run_folder)
    assert dashboard.token is None
    code, page, headers = get(dashboard, "/")
    assert code == 200 and b'<script src="uPlot.iife.min.js"' in page
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert get(dashboard, "/uPlot.iife.min.js")[1].startswith(
        b"/*! https://github.com/leeoniya/uPlot"
    )
    for path in ("/config.toml", "/../workers.json", "/api/workers.json"):
        assert get(dashboard, path)[0] == 404, path
    request = urllib.request.Request(f"http://127.0.0.1:{dashboard.port}/api/status", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 501


def test_loopback_hosts() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("trainer.example.org")


def test_the_command_refuses_what_is_not_a_run_folder(
    tmp_path: Path, run_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dashboard", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["dashboard", str(run_folder), "--bind", "8080"]) == 2
    assert "--bind: expected HOST:PORT, got '8080'" in capsys.readouterr().err
