"""What a run leaves besides checkpoints: metrics.jsonl and where it is mirrored (`report_to`:
TensorBoard, Weights & Biases in offline mode), and the curves.png drawn from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from swarmrl.base.config import ConfigError
from swarmrl.base.logs import MetricsWriter, read_metrics
from swarmrl.base.recipes import load_config
from swarmrl.cli.choices import check_choices
from swarmrl.trainer.curves import CURVES_FILE, latest, write_curves


def write_run(folder: Path, report_to: list[str]) -> None:
    writer = MetricsWriter(folder, report_to, {"trainer": {"max_steps": 3}})
    writer.write(0, {"accuracy": 0.25, "count": 8}, kind="eval")
    for step in (1, 2, 3):
        parts = {"wait_seconds": 1.0, "optimize_seconds": 4.0, "publish_seconds": 0.5}
        writer.write(step, {"loss": 1.0 / step, "reward_mean": 0.2 * step, **parts})
    writer.write(3, {"accuracy": 0.5, "count": 8}, kind="eval")
    writer.close()


def test_metrics_go_to_the_file_and_only_where_asked(tmp_path: Path) -> None:
    write_run(tmp_path / "none", [])
    write_run(tmp_path / "board", ["tensorboard"])
    records, offset = read_metrics(tmp_path / "none")
    assert [(r["kind"], r["step"]) for r in records] == [("eval", 0)] + [
        ("train", s) for s in (1, 2, 3)
    ] + [("eval", 3)]
    assert offset == (tmp_path / "none" / "metrics.jsonl").stat().st_size
    assert not (tmp_path / "none" / "tensorboard").exists()
    assert any((tmp_path / "board" / "tensorboard").iterdir())
    assert not (tmp_path / "board" / "wandb").exists()


def test_wandb_offline_gets_the_scalars_under_trl_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    folder = tmp_path / "run"
    writer = MetricsWriter(folder, ["wandb"], {"trainer": {"max_steps": 3}})
    writer.write(1, {"loss": 0.5, "reward_mean": 0.25, "note": "text is not a scalar"})
    assert (wandb.run.name, wandb.run.config["trainer"]) == ("run", {"max_steps": 3})
    run_id = (folder / "wandb.id").read_text()
    writer.close()
    assert wandb.run is None
    [stored] = (folder / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = stored.read_bytes()
    assert b"train/loss" in data and b"train/reward_mean" in data and b"train/note" not in data
    again = MetricsWriter(folder, ["wandb"])  # a resumed run goes on in the same W&B run
    assert wandb.run.id == run_id
    again.close()


def test_report_to_takes_trl_style_text_and_checks_for_wandb(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_config(None, ["--logging.report_to", "none"]).logging.report_to == []
    both = load_config(None, ["--logging.report_to", "tensorboard,wandb"])
    assert both.logging.report_to == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"logging\.report_to"):
        load_config(None, ["--logging.report_to", "mlflow"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="'wandb' needs the wandb package: pip install wandb"):
        check_choices(both)


def test_dashboard_address_is_checked() -> None:
    config = load_config(None, ["--logging.dashboard", "0.0.0.0:8080"])
    assert config.logging.dashboard_address == ("0.0.0.0", 8080)
    assert load_config(None, ["--logging.dashboard", "off"]).logging.dashboard_address is None
    for bad in ("8080", "host:port", "host:70000"):
        with pytest.raises(ConfigError, match=r"logging\.dashboard: expected HOST:PORT"):
            load_config(None, ["--logging.dashboard", bad])


def test_curves_png_is_drawn_from_the_metrics(tmp_path: Path) -> None:
    from matplotlib.image import imread

    write_run(tmp_path, [])
    path = write_curves(tmp_path)
    assert path == tmp_path / CURVES_FILE
    height, width, _ = imread(path).shape
    assert (width, height) == (1200, 640)


def test_a_resumed_run_draws_the_latest_record_of_each_step() -> None:
    records = [
        {"kind": "train", "step": 1, "loss": 1.0},
        {"kind": "train", "step": 2, "loss": 0.9},  # lost in a crash, trained again
        {"kind": "train", "step": 2, "loss": 0.8},
        {"kind": "eval", "step": 2, "accuracy": 0.5},
    ]
    assert [r["loss"] for r in latest(records, "train")] == [1.0, 0.8]


def test_a_line_being_written_is_left_for_later(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1}) + "\n{")
    records, offset = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1] and read_metrics(tmp_path, offset) == ([], offset)
