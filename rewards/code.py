"""Code rewards: take the program out of a completion, run it against the task's tests, score.

`extract_program` takes the last fenced block tagged Python or untagged (a block cut off by
the token limit counts), else the whole completion. Tests come from a row's columns, in any of
these shapes (`task_tests`):
- `tests`: a list of assert snippets (MBPP / HumanEval style), a list of
  `{"input", "output"}` stdin/stdout cases, or `{"inputs": [...], "outputs": [...]}`;
  a JSON string of any of those works too;
- MBPP's `test_list` (+ `test_setup_code`), HumanEval's `test` + `entry_point`, APPS'
  `input_output` (stdin/stdout only), CodeContests' `public_tests` + `private_tests`.

Assert snippets run one after another in the program's namespace inside one sandboxed harness,
which reports each passed test with a per-run nonce, so a program that exits early (even with
status 0) passes nothing. MBPP's task text does not name the function its tests call: when the
tests call exactly one name the program leaves undefined, the program's last function is bound
to it. A stdin/stdout case passes when the program exits 0 and its output has the expected
whitespace-separated tokens. Identical programs in a batch run once.

`code_tests` scores the fraction of tests passed, `code_tests_all` 1.0 only when all pass,
`code_block_format` rewards a fenced Python block. Rows without tests score None.
"""

from __future__ import annotations

import json
import re
import secrets
import textwrap
from dataclasses import dataclass
from typing import Any

from swarmrl.rewards.registry import completion_text, register
from swarmrl.rewards.sandbox import Limits, RunResult, run_many

DEFAULT_LIMITS = Limits()
PYTHON_TAGS = {"", "py", "py3", "python", "python3"}
_FENCE = re.compile(r"```[ \t]*([\w+.#-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CLOSED_FENCE = re.compile(r"```[ \t]*([\w+.#-]*)[^\n]*\n(.*?)```", re.DOTALL)

HARNESS = """\
import ast, builtins, json, os, sys

job = json.loads(sys.stdin.read())
report = os.fdopen(os.dup(1), "w", buffering=1)
quiet = os.open(os.devnull, os.O_RDWR)
os.dup2(quiet, 0)
os.dup2(quiet, 1)
namespace = {"__name__": "solution"}
exec(compile(job["program"], "solution.py", "exec"), namespace)
functions = [n.name for n in ast.parse(job["program"]).body if isinstance(n, ast.FunctionDef)]
called = set()
for test in job["tests"]:
    try:
        nodes = list(ast.walk(ast.parse(test)))
    except SyntaxError:
        continue
    calls = [n.func for n in nodes if isinstance(n, ast.Call)]
    called |= {f.id for f in calls if isinstance(f, ast.Name)}
missing = [name for name in called if name not in namespace and not hasattr(builtins, name)]
if functions and len(missing) == 1:
    namespace[missing[0]] = namespace[functions[-1]]
for index, test in enumerate(job["tests"]):
    try:
        exec(compile(test, f"test_{index}.py", "exec"), namespace)
    except BaseException:
        continue
    report.write(f"{job['nonce']} {index}\\n")
"""


@dataclass(frozen=True)
class TaskTests:
    asserts: tuple[str, ...] = ()  # snippets run after the program, in its namespace
    cases: tuple[tuple[str, str], ...] = ()  # (stdin, expected stdout)

    def __len__(self) -> int:
        return len(self.asserts) + len(self.cases)


def extract_program(completion: str) -> str:
    """The last Python (or untagged) fenced block, else the whole completion."""
    blocks = [code for tag, code in _FENCE.findall(completion) if tag.lower() in PYTHON_TAGS]
    return textwrap.dedent(blocks[-1] if blocks else completion).strip()


def _cases(value: Any) -> tuple[tuple[str, str], ...]:
    """Stdin/stdout pairs from `{"inputs", "outputs"}`, `{"input", "output"}` or case lists."""
    if isinstance(value, dict):
        inputs = value.get("inputs", value.get("input"))
        outputs = value.get("outputs", value.get("output"))
        return tuple(zip(map(str, inputs or []), map(str, outputs or []), strict=True))
    return tuple((str(case["input"]), str(case["output"])) for case in value)


def _parse(value: Any) -> TaskTests:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return TaskTests(asserts=(value,))
        if isinstance(value, str):
            return TaskTests(asserts=(value,))
    if isinstance(value, dict) or (value and isinstance(value[0], dict)):
        return TaskTests(cases=_cases(value))
    return TaskTests(asserts=tuple(str(test) for test in value))


def task_tests(row: dict[str, Any]) -> TaskTests | None:
    """A row's tests from whichever known column holds them; None when it has none."""
    if row.get("tests") is not None:
        tests = _parse(row["tests"])
    elif row.get("test_list") is not None:
        setup = row.get("test_setup_code") or ""
        tests = TaskTests(asserts=tuple(f"{setup}\n{test}" for test in row["test_list"]))
    elif row.get("test") is not None and row.get("entry_point"):
        tests = TaskTests(asserts=(f"{row['test']}\ncheck({row['entry_point']})",))
    elif row.get("input_output"):
        spec = json.loads(row["input_output"])
        tests = TaskTests() if spec.get("fn_name") else TaskTests(cases=_cases(spec))
    elif row.get("public_tests") is not None or row.get("private_tests") is not None:
        found = (row.get(k) for k in ("public_tests", "private_tests"))
        tests = TaskTests(cases=tuple(case for value in found if value for case in _cases(value)))
    else:
        return None
    return tests if len(tests) else None


def _passed_asserts(result: RunResult, nonce: str, count: int) -> int:
    if result.truncated:
        return 0
    passed = set()
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == nonce and parts[1].isdigit():
            passed.add(int(parts[1]))
    return len(passed & set(range(count)))


def _case_passed(result: RunResult, expected: str) -> bool:
    return result.ok and result.stdout.split() == expected.split()


def score_programs(
    programs: list[str],
    tests: list[TaskTests | None],
    all_or_nothing: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    workers: int | None = None,
    sandbox: bool | None = None,
) -> list[float | None]:
    """Fraction of each program's tests passed (or 1.0/0.0 when `all_or_nothing`)."""
    jobs: dict[tuple[str, str], tuple[str, str]] = {}  # (program, test key) -> (source, stdin)
    nonces: dict[tuple[str, str], str] = {}
    for program, spec in zip(programs, tests, strict=True):
        if spec is None or not program:
            continue
        if spec.asserts:
            key = (program, json.dumps(spec.asserts))
            if key not in jobs:
                nonces[key] = secrets.token_hex(16)
                payload = {"program": program, "tests": spec.asserts, "nonce": nonces[key]}
                jobs[key] = (HARNESS, json.dumps(payload))
        for stdin, _ in spec.cases:
            jobs.setdefault((program, "stdin:" + stdin), (program, stdin))
    results = dict(zip(jobs, run_many(list(jobs.values()), limits, workers, sandbox), strict=True))

    scores: list[float | None] = []
    for program, spec in zip(programs, tests, strict=True):
        if spec is None:
            scores.append(None)
            continue
        passed = 0
        if program and spec.asserts:
            key = (program, json.dumps(spec.asserts))
            passed = _passed_asserts(results[key], nonces[key], len(spec.asserts))
        elif program:
            passed = sum(
                _case_passed(results[(program, "stdin:" + stdin)], expected)
                for stdin, expected in spec.cases
            )
        fraction = passed / len(spec)
        scores.append(float(fraction == 1.0) if all_or_nothing else fraction)
    return scores


def _score(
    completions: list[str], columns: dict[str, list[Any]], all_or_nothing: bool
) -> list[float | None]:
    rows = [{key: values[i] for key, values in columns.items()} for i in range(len(completions))]
    programs = [extract_program(completion_text(c)) for c in completions]
    return score_programs(programs, [task_tests(row) for row in rows], all_or_nothing)


@register("code_tests")
def code_tests(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
    """The fraction of the task's tests the completion's program passes, in the sandbox."""
    return _score(completions, columns, all_or_nothing=False)


@register("code_tests_all")
def code_tests_all(
    prompts: list[str], completions: list[str], **columns: Any
) -> list[float | None]:
    """1.0 when the completion's program passes every test of the task, else 0.0."""
    return _score(completions, columns, all_or_nothing=True)


@register("code_block_format")
def code_block_format(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion has a closed, non-empty ```python (or untagged) block."""
    return [
        float(any(t.lower() in PYTHON_TAGS and c.strip() for t, c in _CLOSED_FENCE.findall(text)))
        for text in map(completion_text, completions)
    ]
