"""`swarmrl rewards test`: a reward function tried on samples before a run (rewards/trial.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from swarmrl.cli import main
from swarmrl.rewards.trial import RewardContractError, try_reward

REWARDS_MODULE = """
def flaky(prompts, completions, answer, **columns):
    if "boom" in completions:
        raise RuntimeError("cannot score boom")
    return [None if c == "?" else float(c == a) for c, a in zip(completions, answer)]

def words(prompts, completions, **columns):
    return ["yes" for _ in completions]

def short(prompts, completions, **columns):
    return [1.0]
"""


@pytest.fixture
def rewards_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "trial_rewards.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "trial_rewards"


def write_samples(path: Path, completions: list[str], answer: str = "7") -> Path:
    rows = [
        {"prompt": f"q{i}", "completion": c, "answer": answer} for i, c in enumerate(completions)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_trial_keeps_nones_failed_calls_and_one_time_per_call() -> None:
    def reward(prompts: list[str], completions: list[str], answer: list[str], **_: object):
        if "boom" in completions:
            raise RuntimeError("cannot score boom")
        scores = {"?": None, "nan": math.nan}
        return [scores.get(c, float(c == a)) for c, a in zip(completions, answer, strict=True)]

    completions = ["7", "?", "1", "nan", "boom", "7"]
    trial = try_reward("r", reward, ["q"] * 6, completions, {"answer": ["7"] * 6}, batch_size=2)
    assert trial.rewards == [1.0, None, 0.0, None, None, None]
    assert len(trial.seconds) == 3 and all(s >= 0 for s in trial.seconds)
    [(first, end, trace)] = trial.failures
    assert (first, end) == (4, 6)
    assert "RuntimeError: cannot score boom" in trace and "Traceback" in trace


def test_a_trial_calls_a_trl_function_by_keyword() -> None:
    from tests.trl_rewards import reward_len

    trial = try_reward("len", reward_len, ["q", "q"], ["x" * 20, "x" * 10], {}, batch_size=2)
    assert trial.failures == [] and trial.rewards == [0.0, -0.5]


@pytest.mark.parametrize(
    ("returned", "problem"),
    [(["yes", 1.0], "returned a str, not a number or None"), ([1.0], "returned 1 rewards for 2")],
)
def test_what_training_could_never_use_is_an_error_naming_the_function(
    returned: list, problem: str
) -> None:
    with pytest.raises(RewardContractError) as caught:
        try_reward(
            "mine:fn", lambda prompts, completions, **k: returned, ["q", "q"], ["a", "b"], {}, 2
        )
    assert str(caught.value).startswith(f"reward function mine:fn {problem}")


def test_the_report_shows_each_score_with_examples_and_the_nones() -> None:
    completions = ["7"] * 3 + ["1"] * 5 + ["?"] * 2

    def reward(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
        return [None if c == "?" else float(c == "7") for c in completions]

    trial = try_reward("exact", reward, ["q"] * 10, completions, {"answer": ["7"] * 10}, 4)
    report = trial.report(examples=1).splitlines()
    assert report[0] == "reward function exact: 10 samples in 3 call(s)"
    assert "  None (or NaN/inf): 2 of 10" in report
    histogram = {line.split()[0]: int(line.split()[-1]) for line in report if "#" in line}
    assert histogram == {"0": 5, "1": 3}
    examples = [line.split()[0] for line in report if "completion" in line]
    assert examples == ["1", "0", "None"]  # one per distinct score, in the order first seen
    assert any(line.startswith("  distribution of 8 numbers: mean 0.375;") for line in report)


def test_many_distinct_values_are_binned() -> None:
    values = [i / 99 for i in range(100)]
    trial = try_reward(
        "spread",
        lambda prompts, completions, **k: values[: len(completions)],
        ["q"] * 100,
        ["c"] * 100,
        {},
        100,
    )
    bars = [line for line in trial.report(examples=0).splitlines() if "#" in line]
    assert len(bars) == 10
    assert sum(int(line.split()[-1]) for line in bars) == 100


def test_the_command_on_a_jsonl_file(
    rewards_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = write_samples(tmp_path / "s.jsonl", ["7", "7", "3", "?", "boom", "7"])
    code = main(
        [
            "rewards",
            "test",
            f"{rewards_module}:flaky",
            "--samples",
            str(samples),
            "--batch-size",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1  # a call raised
    assert out.startswith(f"reward function {rewards_module}:flaky: 6 samples in 3 call(s)")
    assert "RuntimeError: cannot score boom" in out
    assert "  None (or NaN/inf): 1 of 6" in out


def test_a_registered_reward_on_a_jsonl_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = write_samples(tmp_path / "s.jsonl", ["7", "The answer is 7", "8"])
    assert main(["rewards", "test", "integer_match", "--samples", str(samples)]) == 0
    histogram = [line.split() for line in capsys.readouterr().out.splitlines() if "#" in line]
    assert [(row[0], row[-1]) for row in histogram] == [("0", "1"), ("1", "2")]


@pytest.mark.parametrize("function", ["words", "short"])
def test_an_unusable_return_exits_2_naming_the_function(
    function: str, rewards_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = write_samples(tmp_path / "s.jsonl", ["7", "8"])
    assert main(["rewards", "test", f"{rewards_module}:{function}", "--samples", str(samples)]) == 2
    assert capsys.readouterr().err.startswith(
        f"swarmrl: reward function {rewards_module}:{function}"
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"prompt": "q"\n', "s.jsonl:1: not JSON"),
        ('{"prompt": "q", "completion": "c"}\n{"prompt": "q"}\n', "s.jsonl:2: needs string fields"),
    ],
)
def test_unreadable_samples_exit_2_naming_the_line(
    content: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "s.jsonl").write_text(content)
    assert main(["rewards", "test", "integer_match", "--samples", str(tmp_path / "s.jsonl")]) == 2
    assert problem in capsys.readouterr().err


def test_an_unknown_function_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    samples = write_samples(tmp_path / "s.jsonl", ["7"])
    assert main(["rewards", "test", "no_such_reward", "--samples", str(samples)]) == 2
    assert "unknown reward function 'no_such_reward'" in capsys.readouterr().err


@pytest.mark.e2e
def test_fresh_generations_of_the_recipe_model(
    model_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = ["rewards", "test", "integer_match", "--generate", "6", "--batch-size", "4"]
    assert (
        main(
            [*arguments, "--sampling.num_generations", "3", "--sampling.max_completion_length", "8"]
        )
        == 0
    )
    report = capsys.readouterr().out.splitlines()
    assert report[0] == "reward function integer_match: 6 samples in 2 call(s)"
    examples = [line for line in report if "  prompt " in line]
    assert examples and all("What is" in line for line in examples)
