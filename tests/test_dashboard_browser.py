"""The dashboard in a real headless browser (Debian's chromium, driven by playwright): during a
short real run (`swarmrl train` + `swarmrl worker`), then on the finished run's folder
(`swarmrl dashboard`). The page's numbers are checked against the run folder's files."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, start_trainer, start_worker, swarmrl

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
CHARTS = ["reward", "accuracy", "loss", "step-time", "update-bytes", "throughput"]


@pytest.fixture
def page() -> Iterator[Any]:
    """A browser page; page.errors collects script errors and failed requests."""
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} not found: apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.on(
            "console",
            lambda m: (
                page.errors.append(f"{m.text} ({m.location['url']})") if m.type == "error" else None
            ),
        )
        yield page
        browser.close()


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode} before listening"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout_s}s")


def points(page: Any, chart: str) -> int:
    return int(page.get_attribute(f"#{chart}", "data-points") or 0)


def cells(page: Any, worker: str) -> list[str]:
    return page.locator(f'tr[data-worker="{worker}"] td').all_inner_texts()


def train_steps(folder: Path) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [record["step"] for line in lines if (record := json.loads(line))["kind"] == "train"]


def test_the_dashboard_follows_a_live_run_then_shows_its_folder(
    model_path: str, tmp_path: Path, page: Any
) -> None:
    folder, port = tmp_path / "dash", free_port()
    trainer, endpoint = start_trainer(tmp_path, "dash", 2, "--dashboard", f"127.0.0.1:{port}")
    worker = start_worker(tmp_path, endpoint, "w1")
    try:
        wait_for_port(port, 180, trainer)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector('tr[data-worker="w1"]', timeout=180_000)
        assert cells(page, "w1")[1] == "connected"
        # Curves appear with the first step and grow with the next, without a reload. (The
        # page's CSP forbids eval, so the waits are selectors, not wait_for_function.)
        page.wait_for_selector('#loss[data-points="1"]', timeout=300_000)
        page.wait_for_selector('#loss[data-points="2"]', timeout=300_000)
        assert page.locator("#loss canvas").count() == 1  # uPlot drew it
        assert int(cells(page, "w1")[2]) > 0  # accepted samples
        page.screenshot(path=str(tmp_path / "dashboard-live.png"), full_page=True)
        assert page.errors == []
        page.goto("about:blank")  # its polls would fail once the trainer is gone
        assert trainer.wait(timeout=300) == 0, (tmp_path / "dash-console.log").read_text()[-3000:]
    finally:
        for process in (trainer, worker):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert train_steps(folder) == [1, 2]
    assert (folder / "curves.png").read_bytes().startswith(b"\x89PNG")
    ledger = json.loads((folder / "workers.json").read_text())
    assert ledger["finished"] and ledger["workers"]["w1"]["samples"] > 0

    # Later, on the folder alone: the finished state, every step, the final counts.
    viewer_port = free_port()
    viewer = swarmrl(
        "dashboard", str(folder), "--bind", f"127.0.0.1:{viewer_port}", log=tmp_path / "viewer.log"
    )
    try:
        wait_for_port(viewer_port, 30, viewer)
        page.goto(f"http://127.0.0.1:{viewer_port}/")
        page.wait_for_selector("#state.finished")
        page.wait_for_selector('#loss[data-points="2"]')
        row = cells(page, "w1")
        assert row[1] == "left" and int(row[2]) == ledger["workers"]["w1"]["samples"]
        assert row[5] == "100.0%"
        assert {chart: points(page, chart) for chart in CHARTS if chart != "accuracy"} == {
            chart: 2 for chart in CHARTS if chart != "accuracy"
        }
        page.screenshot(path=str(tmp_path / "dashboard-finished.png"), full_page=True)
        assert page.errors == []
    finally:
        viewer.terminate()
        viewer.wait(timeout=30)
