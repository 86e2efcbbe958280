"""Code rewards: program extraction, test formats, scoring, the sandbox against attacks, recipes."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import swarmrl
from swarmrl.base.config import DataConfig
from swarmrl.base.recipes import load_config
from swarmrl.rewards import load_reward_function, score_completions
from swarmrl.rewards import sandbox as sandbox_module
from swarmrl.rewards.code import (
    TaskTests,
    code_block_format,
    extract_program,
    score_programs,
    task_tests,
)
from swarmrl.rewards.sandbox import (
    SANDBOX_UID_BASE,
    Limits,
    SandboxUnavailable,
    run_many,
    run_python,
    sandbox_enabled,
)
from swarmrl.trainer.data import DatasetTasks, load_tasks

FIXTURES = Path(__file__).parent / "fixtures"
LIMITS = Limits(timeout_s=2.0)
needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None and not os.environ.get("CI"),
    reason="bubblewrap is not installed (apt-get install -y bubblewrap); CI installs it",
)

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = TaskTests(
    asserts=("assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(2, 2) == 4")
)


def score(programs: list[str], tests: TaskTests, all_or_nothing: bool = False) -> list:
    return score_programs(programs, [tests] * len(programs), all_or_nothing, LIMITS)


# --- extracting the program ---


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Here:\n```python\nx = 1\n```\nDone.", "x = 1"),
        ("```py\na = 1\n```\nthen\n```Python3\nb = 2\n```", "b = 2"),
        ("```\nuntagged = 1\n```", "untagged = 1"),
        ("```python\ncode = 1\n```\n```text\noutput 1\n```", "code = 1"),
        ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # cut off
        ("def f():\n    return 2", "def f():\n    return 2"),  # no fence at all
        ("1. Code:\n   ```python\n   y = 3\n   ```", "y = 3"),  # indented in a list
    ],
)
def test_extract_program(completion: str, expected: str) -> None:
    assert extract_program(completion) == expected


def test_code_block_format() -> None:
    completions = [
        "```python\nx = 1\n```",
        "```python\nx = 1",
        "```bash\nls\n```",
        "x = 1",
        "```\n\n```",
    ]
    assert code_block_format(["q"] * 5, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]


# --- test formats ---


def test_task_tests_formats() -> None:
    asserts = TaskTests(asserts=("assert f(1) == 1",))
    cases = TaskTests(cases=(("1\n", "2\n"), ("3", "4")))
    case_list = [{"input": "1\n", "output": "2\n"}, {"input": "3", "output": "4"}]
    assert task_tests({"tests": ["assert f(1) == 1"]}) == asserts
    assert task_tests({"tests": json.dumps(["assert f(1) == 1"])}) == asserts
    assert task_tests({"tests": "assert f(1) == 1"}) == asserts
    assert task_tests({"tests": case_list}) == cases
    assert task_tests({"tests": {"inputs": ["1\n", "3"], "outputs": ["2\n", "4"]}}) == cases
    mbpp = {"test_list": ["assert f(1) == 1"], "test_setup_code": "import math"}
    assert task_tests(mbpp) == TaskTests(asserts=("import math\nassert f(1) == 1",))
    humaneval = {"test": "def check(candidate):\n    pass", "entry_point": "f"}
    assert task_tests(humaneval) == TaskTests(
        asserts=("def check(candidate):\n    pass\ncheck(f)",)
    )
    apps = {"input_output": json.dumps({"inputs": ["1\n", "3"], "outputs": ["2\n", "4"]})}
    assert task_tests(apps) == cases
    assert (
        task_tests({"input_output": json.dumps({"fn_name": "f", "inputs": [], "outputs": []})})
        is None
    )
    contests = {
        "public_tests": {"input": ["1\n"], "output": ["2\n"]},
        "private_tests": {"input": ["3"], "output": ["4"]},
    }
    assert task_tests(contests) == cases
    assert task_tests({"answer": "42"}) is None
    assert task_tests({"tests": []}) is None


# --- scoring ---


@needs_bwrap
def test_assert_tests_fraction_and_all_or_nothing() -> None:
    programs = [
        ADD,
        "def add(a, b):\n    return a * b\n",
        "def add(a, b):\n    return 3\n",
        "syntax error(",
        "",
    ]
    assert score(programs, ADD_TESTS) == [1.0, pytest.approx(2 / 3), pytest.approx(1 / 3), 0.0, 0.0]
    assert score(programs, ADD_TESTS, all_or_nothing=True) == [1.0, 0.0, 0.0, 0.0, 0.0]


@needs_bwrap
def test_stdin_stdout_cases() -> None:
    cases = TaskTests(cases=(("3 4\n", "7\n"), ("10 -2\n", "8"), ("0 0", "0")))
    programs = [
        "a, b = map(int, input().split())\nprint(a + b)",
        "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b, end='  \\n\\n')",
        "print(7)",
        # the right output, then exit status 1
        "a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(1)",
    ]
    assert score(programs, cases) == [1.0, 1.0, pytest.approx(1 / 3), 0.0]
    assert score(programs, cases, all_or_nothing=True) == [1.0, 1.0, 0.0, 0.0]


@needs_bwrap
def test_reward_functions_through_scoring() -> None:
    completions = [
        f"```python\n{ADD}```",
        "```python\ndef add(a, b):\n    return 0\n```",
        "no code",
    ]
    columns = {
        "answer": [""] * 4,
        "tests": [list(ADD_TESTS.asserts)] * 3 + [None],
        "completion_ids": [[1]] * 4,
    }
    functions = [
        ("tests", load_reward_function("code_tests"), 1.0),
        ("all", load_reward_function("code_tests_all"), 1.0),
        ("format", load_reward_function("code_block_format"), 0.5),
    ]
    scores = score_completions(functions, ["q"] * 4, [*completions, ADD], columns)
    assert scores.errors == {}
    assert scores.per_function["tests"] == [1.0, pytest.approx(1 / 3), 0.0, None]
    assert scores.per_function["all"] == [1.0, 0.0, 0.0, None]
    assert scores.total == [2.5, pytest.approx(1 / 3 + 0.5), 0.0, 0.0]


@needs_bwrap
def test_early_exit_and_fake_reports_pass_nothing() -> None:
    programs = [
        ADD + "import sys\nsys.exit(0)",
        ADD + "import os\nos._exit(0)",
        ADD + "print('0 0\\n1 1\\n2 2', flush=True)\nraise SystemExit",
        ADD + "import os\nos.write(1, b'ok 0\\nok 1\\n')\nexit()",
    ]
    assert score(programs, ADD_TESTS) == [0.0, 0.0, 0.0, 0.0]


@needs_bwrap
def test_mbpp_function_name_is_bound() -> None:
    tests = TaskTests(asserts=("assert sum_list([1, 2]) == 3", "assert sum_list([]) == 0"))
    helper_then_main = (
        "def helper(x):\n    return x\n\ndef total(xs):\n    return sum(map(helper, xs))\n"
    )
    assert score(["def total(xs):\n    return sum(xs)\n", helper_then_main], tests) == [1.0, 1.0]


@needs_bwrap
def test_pool_is_bounded() -> None:
    jobs = [("import time\ntime.sleep(0.5)", "")] * 4
    start = time.monotonic()
    results = run_many(jobs, LIMITS, workers=2, sandbox=True)
    assert all(result.ok for result in results)
    assert time.monotonic() - start >= 1.0  # two rounds of two


# --- the sandbox against attacks: each scores 0, is contained, and the machine is unharmed ---


def sandbox_processes() -> list[int]:
    """Processes left running under the per-run sandbox uids (root mode)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid = int(
                next(
                    line for line in status.read_text().splitlines() if line.startswith("Uid:")
                ).split()[1]
            )
        except (OSError, StopIteration, ValueError):
            continue
        if uid >= SANDBOX_UID_BASE:
            found.append(int(status.parent.name))
    return found


ATTACKS = {
    "infinite loop": "while True:\n    pass\n",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n"
    "    except OSError:\n        pass\n",
    "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(10**8))\n",
    "huge output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "thread bomb": "import threading, time\nwhile True:\n"
    "    threading.Thread(target=time.sleep, args=(9,)).start()\n",
}


@needs_bwrap
@pytest.mark.parametrize("name", list(ATTACKS))
def test_resource_attacks_are_contained(name: str) -> None:
    start = time.monotonic()
    asserts, cases = TaskTests(asserts=("assert True",)), TaskTests(cases=(("", "x"),))
    programs = [ATTACKS[name] + ADD, ATTACKS[name] + "print('x')\n"]
    assert score_programs(programs, [asserts, cases], limits=LIMITS) == [0.0, 0.0]
    assert time.monotonic() - start < LIMITS.timeout_s + 3
    if os.geteuid() == 0:
        assert sandbox_processes() == []


@needs_bwrap
def test_huge_output_is_capped() -> None:
    result = run_python("while True:\n    print('x' * 100000)\n", limits=LIMITS)
    assert not result.ok and result.truncated and len(result.stdout) == LIMITS.output_bytes


@needs_bwrap
def test_network_is_unreachable() -> None:
    with socket.socket() as listener:  # a service on this machine, like the trainer's port
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        programs = [
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n" + ADD,
            "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n" + ADD,
            "import socket\nsocket.getaddrinfo('example.com', 80)\n" + ADD,
        ]
        assert score(programs, ADD_TESTS) == [0.0, 0.0, 0.0]
        with pytest.raises(TimeoutError):
            listener.accept()


@needs_bwrap
def test_files_outside_the_sandbox_are_out_of_reach(tmp_path: Path) -> None:
    project = Path(swarmrl.__file__).resolve().parents[1]
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    home_secret = Path.home() / f".swarmrl-sandbox-test-{os.getpid()}"
    home_secret.write_text("s3cret")
    try:
        programs = [
            f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')\n" + ADD,
            f"open({str(project / 'pwned')!r}, 'w').write('x')\n" + ADD,
            f"open({sys.base_prefix + '/pwned'!r}, 'w').write('x')\n" + ADD,
            f"assert 's3cret' in open({str(home_secret)!r}).read()\n" + ADD,
            f"assert 's3cret' in open({str(secret)!r}).read()\n" + ADD,
            f"open({str(project / 'README.md')!r}).read()\n" + ADD,
            f"open({sys.executable!r}, 'rb').read(1)\n" + ADD,  # the venv
        ]
        assert score(programs, ADD_TESTS) == [0.0] * len(programs)
    finally:
        home_secret.unlink()
    assert not (tmp_path / "pwned").exists()
    assert not (project / "pwned").exists()
    assert not Path(sys.base_prefix, "pwned").exists()


@needs_bwrap
def test_project_cannot_be_imported() -> None:
    project = Path(swarmrl.__file__).resolve().parents[1]
    programs = [
        "import swarmrl\n" + ADD,
        f"import sys\nsys.path[:0] = [{str(project)!r}, {str(project.parent)!r}]\nimport swarmrl\n"
        + ADD,
        "import pytest\n" + ADD,  # nor the venv's or the interpreter's site-packages
    ]
    assert score(programs, ADD_TESTS) == [0.0, 0.0, 0.0]
    result = run_python("import swarmrl", limits=LIMITS)
    assert "ModuleNotFoundError: No module named 'swarmrl'" in result.stderr


@needs_bwrap
def test_killing_the_parent_fails() -> None:
    canary = subprocess.Popen(["sleep", "30"])
    try:
        programs = [
            f"import os\nos.kill({os.getpid()}, 9)\nos.kill({canary.pid}, 9)\n" + ADD,
            "import os\nos.kill(os.getppid(), 9)\n" + ADD,
            "import os\nos.kill(-1, 9)\n" + ADD,
        ]
        assert score(programs, ADD_TESTS) == [0.0, 0.0, 0.0]
        assert canary.poll() is None
    finally:
        canary.kill()
        canary.wait()


@needs_bwrap
def test_environment_is_cleared(monkeypatch) -> None:
    monkeypatch.setenv("SWARMRL_SECRET_TOKEN", "s3cret")
    result = run_python("import os\nprint(dict(os.environ))", limits=LIMITS)
    assert result.ok and "s3cret" not in result.stdout


# --- missing sandbox, unsafe opt-in ---


def test_missing_bwrap_names_the_install_command(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap"):
        sandbox_module.check_sandbox.__wrapped__()


def test_unsafe_opt_in_is_loudly_logged(monkeypatch, caplog) -> None:
    monkeypatch.setenv("SWARMRL_UNSAFE_NO_SANDBOX", "1")
    sandbox_module._warn_unsafe.cache_clear()
    with caplog.at_level(logging.WARNING, logger="swarmrl.rewards.sandbox"):
        assert sandbox_enabled() is False
        assert score_programs([ADD], [ADD_TESTS], limits=LIMITS) == [1.0]
    assert "WITHOUT a sandbox" in caplog.text


# --- recipes ---


@needs_bwrap
def test_offline_recipe_tasks_and_their_reference_solutions() -> None:
    config = load_config("code_offline")
    tasks = load_tasks(config.data, config.eval.heldout_size)
    assert isinstance(tasks, DatasetTasks)
    train = [tasks.train(i) for i in range(len(tasks.rows))]
    assert len(train) >= 60 and len(tasks.heldout) == 20
    assert {t.question for t in train}.isdisjoint(t.question for t in tasks.heldout)
    every = train + tasks.heldout
    columns = {"answer": [t.answer for t in every], "tests": [t.columns["tests"] for t in every]}
    completions = [f"```python\n{t.answer}\n```" for t in every]
    assert load_reward_function("code_tests_all")(["q"] * len(every), completions, **columns) == [
        1.0
    ] * len(every)
    assert config.eval.accuracy_reward == "code_tests"


@needs_bwrap
def test_mbpp_rows_load_and_score() -> None:
    fixture = str(FIXTURES / "mbpp_sample.jsonl")
    config = DataConfig(
        source="huggingface",
        path="json",
        data_files={"train": fixture, "test": fixture},
        question_field="text",
        answer_field="code",
    )
    tasks = DatasetTasks(config, heldout_size=4)
    assert tasks.heldout[0].question.startswith("Write a function to find the similar elements")
    columns: dict[str, list] = {"answer": [t.answer for t in tasks.heldout]}
    for key in tasks.heldout[0].columns:
        columns[key] = [t.columns[key] for t in tasks.heldout]
    references = [f"```python\n{t.answer}\n```" for t in tasks.heldout]
    code_tests = load_reward_function("code_tests")
    assert code_tests(["q"] * 4, references, **columns) == [1.0] * 4
    assert code_tests(["q"] * 4, ["def f():\n    return 0"] * 4, **columns) == [0.0] * 4
    assert load_config("mbpp").data.path == "google-research-datasets/mbpp"
