"""Tests for swarmrl.cli: override splitting, --dry-run, error exits, and a fast, light --help."""

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from swarmrl.base.recipes import split_overrides
from swarmrl.cli import main


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
    )


def test_split_overrides() -> None:
    argv = [
        "run",
        "my.toml",
        "--trainer.learning_rate",
        "3e-5",
        "--dry-run",
        "--eval.before=false",
        "--workers",
        "3",
        "--swarm.bind",
        "tcp://0.0.0.0:5555",
    ]
    rest, overrides = split_overrides(argv)
    assert rest == ["run", "my.toml", "--dry-run", "--workers", "3"]
    assert overrides == [
        "--trainer.learning_rate",
        "3e-5",
        "--eval.before=false",
        "--swarm.bind",
        "tcp://0.0.0.0:5555",
    ]


def test_split_overrides_ignores_dots_after_equals_and_in_values() -> None:
    rest, overrides = split_overrides(["--resume=runs/a.b", "--bind", "tcp://1.2.3.4:5"])
    assert rest == ["--resume=runs/a.b", "--bind", "tcp://1.2.3.4:5"]
    assert overrides == []


def test_dry_run_prints_resolved_toml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--dry-run", "--trainer.learning_rate", "3e-5"]) == 0
    out = capsys.readouterr().out
    assert "\nlearning_rate = 3e-05\n" in out
    parsed = tomllib.loads(out)
    assert parsed["trainer"]["learning_rate"] == 3e-5
    assert parsed["trainer"]["max_steps"] == 40  # from the arithmetic recipe
    assert parsed["rewards"] == [{"function": "integer_match", "weight": 1.0}]


def test_dry_run_maps_workers_and_bind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--dry-run", "--workers", "0", "--bind", "tcp://0.0.0.0:5555"]) == 0
    swarm = tomllib.loads(capsys.readouterr().out)["swarm"]
    assert swarm["workers"] == 0
    assert swarm["bind"] == "tcp://0.0.0.0:5555"


def test_dry_run_of_a_recipe_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "mine.toml"
    recipe.write_text('[trainer]\nmax_steps = 7\n\n[[rewards]]\nfunction = "integer_match"\n')
    assert main(["train", str(recipe), "--dry-run", "--checkpoint.keep=4"]) == 0
    parsed = tomllib.loads(capsys.readouterr().out)
    assert parsed["trainer"]["max_steps"] == 7
    assert parsed["checkpoint"]["keep"] == 4


def test_bad_key_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--dry-run", "--trainer.learing_rate", "1e-5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("swarmrl: command line: unknown key")
    assert "learing_rate" in captured.err
    assert "'trainer.learning_rate'" in captured.err


def test_bad_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--dry-run", "--trainer.loss_type", "foo"]) == 2
    err = capsys.readouterr().err
    assert "trainer.loss_type" in err
    assert "(got 'foo')" in err


def test_missing_recipe_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "gone.toml"
    assert main(["run", str(missing), "--dry-run"]) == 2
    assert capsys.readouterr().err == f"swarmrl: {missing}: recipe file not found\n"


def test_worker_rejects_config_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["worker", "--connect", "tcp://127.0.0.1:1", "--trainer.learning_rate", "1"])
    assert caught.value.code == 2
    assert "a worker takes no config overrides: --trainer.learning_rate 1" in (
        capsys.readouterr().err
    )


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2
    assert "usage: swarmrl" in capsys.readouterr().err


def test_bad_key_exit_status_of_the_command(tmp_path: Path) -> None:
    result = run_python(
        ["-m", "swarmrl", "run", "--dry-run", "--trainer.learing_rate", "1"], tmp_path
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "learing_rate" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_is_fast(tmp_path: Path) -> None:
    start = time.monotonic()
    result = run_python(["-m", "swarmrl", "--help"], tmp_path)
    elapsed = time.monotonic() - start
    assert result.returncode == 0
    assert result.stdout.startswith("usage: swarmrl")
    for command in ("run", "train", "worker", "eval"):
        assert command in result.stdout
    assert elapsed < 1.0, f"--help took {elapsed:.2f} s"


def test_cli_import_stays_light(tmp_path: Path) -> None:
    heavy = ["torch", "transformers", "datasets", "zmq", "numpy", "msgpack", "trl"]
    code = (
        "import sys, swarmrl.cli\n"
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('swarmrl'))))\n"
    )
    result = run_python(["-c", code], tmp_path)
    assert result.returncode == 0, result.stderr
    loaded_heavy, loaded_swarmrl = result.stdout.splitlines()
    assert loaded_heavy == ""
    assert "swarmrl.base.config" in loaded_swarmrl.split(",")
    for part in ("trainer", "rollout", "protocol", "rewards", "base.models", "cli.launch"):
        assert f"swarmrl.{part}" not in loaded_swarmrl


def test_override_into_rewards_list_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--dry-run", "--rewards.function", "integer_match"]) == 2
    assert "rewards" in capsys.readouterr().err
