"""Reward functions: answer extraction, math checking, format rewards, registry, batch scoring."""

import logging
import math
import threading

import pytest

from swarmrl.rewards import REWARD_FUNCTIONS, Scores, load_reward_function, score_completions
from swarmrl.rewards.format import answer_only_format, boxed_format, think_answer_format
from swarmrl.rewards.math import (
    extract_final_answer,
    gsm8k_gold_answer,
    integer_match,
    last_boxed,
    math_accuracy,
)


def accuracy(gold: str, completion: str) -> float | None:
    return math_accuracy(["q"], [completion], answer=[gold])[0]


# --- extracting the final answer ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{1} then \boxed{\frac{3}{4}}.", r"\frac{3}{4}"),
        (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
        (r"\boxed{5} and a cut-off \boxed{\frac{1", "5"),
        ("<think>2 or 3</think> <answer> 3 </answer>", "3"),
        ("So the final answer is 42.", "42"),
        ("**Answer:** $-7$", "$-7$"),
        ("48/2 = 24\n#### 24", "24"),
        ("3 apples plus 4 apples make 7 apples", "7"),
        ("she earned 1,000 dollars, then -12", "-12"),
        ("a total of 1,250,000", "1250000"),
        ("no digits here", None),
        (r"\boxed{}", None),
    ],
)
def test_extract_final_answer(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


def test_last_boxed_prefers_the_last_balanced_box() -> None:
    assert last_boxed(r"\boxed{\sqrt{2}} \fbox{x^{2}}") == "x^{2}"
    assert last_boxed("none") is None


def test_gsm8k_gold_answer() -> None:
    assert gsm8k_gold_answer("He pays 3 * 4 = <<3*4=12>>12 dollars.\n#### 12") == "12"
    assert gsm8k_gold_answer("...\n#### 1,000") == "1000"
    assert gsm8k_gold_answer("#### -5") == "-5"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold_answer("The answer is 12.")


# --- math_accuracy (math-verify) ---


@pytest.mark.parametrize(
    ("gold", "completion"),
    [
        (r"\frac{1}{2}", "The answer is 0.5"),
        ("0.5", r"so we get \boxed{\frac{1}{2}}"),
        ("1000", "She saved 1,000 dollars."),
        ("1,000", r"\boxed{1000}"),
        ("42", "The answer is $42$."),
        ("42", r"\boxed{42}"),
        (r"\frac{3}{4}", r"\boxed{\frac{3}{4}}"),
        ("-3", "x moves left, ending at -3"),
        ("7", "first 3, then 5, finally 7"),
        (r"\frac{\sqrt{3}}{2}", r"<answer>\frac{\sqrt{3}}{2}</answer>"),
        (r"3\sqrt{2}", r"\boxed{\sqrt{18}}"),
    ],
)
def test_math_accuracy_right(gold: str, completion: str) -> None:
    assert accuracy(gold, completion) == 1.0


@pytest.mark.parametrize(
    ("gold", "completion"),
    [
        ("7", "first 7, then 5, finally 3"),
        ("3", "-3"),
        (r"3\sqrt{2}", r"\boxed{3}"),
        ("42", "I do not know."),
        ("42", ""),
        ("1", r"\boxed{10^{10^{10}}}"),
        ("1", r"\boxed{100000000!}"),
        ("1", r"\boxed{" + "+".join(["x"] * 400) + "}"),
    ],
)
def test_math_accuracy_wrong(gold: str, completion: str) -> None:
    assert accuracy(gold, completion) == 0.0


def test_math_accuracy_unparsable_gold_is_none() -> None:
    assert accuracy("", "42") is None


def test_math_accuracy_works_off_the_main_thread() -> None:
    results: list[list[float | None]] = []
    errors: list[BaseException] = []

    def score() -> None:
        try:
            completions = [r"\boxed{\frac{1}{2}}", "0.25", r"\boxed{10^{10^{10}}}"]
            results.append(math_accuracy(["q"] * 3, completions, answer=["0.5"] * 3))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and not errors
    assert results == [[1.0, 0.0, 0.0]]


# --- integer_match ---


def test_integer_match() -> None:
    completions = ["3 + 4 = 7", "I think 1,000", "7 then 8", "nothing", "42.0", "-2"]
    golds = ["7", "1000", "7", "7", "42", "-2"]
    assert integer_match([""] * 6, completions, answer=golds) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert integer_match(["q"], ["7"], answer=["seven"]) == [None]


# --- format rewards ---


def test_think_answer_format() -> None:
    completions = [
        "<think>2+2 is 4</think>\n<answer>4</answer>",
        "<think>hmm</think><answer>4</answer> and more",
        "<answer>4</answer>",
        "<think>a</think><think>b</think><answer>4</answer>",
        "2+2 is 4</think> <answer>4</answer>",
    ]
    prompts = ["Q: 2+2? A:"] * 5
    assert think_answer_format(prompts, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    opened = ["Q: 2+2? Assistant: <think>"] * 2
    inside = ["2+2 is 4</think> <answer>4</answer>", "2+2 is 4 <answer>4</answer>"]
    assert think_answer_format(opened, inside) == [1.0, 0.0]


def test_boxed_and_answer_only_format() -> None:
    assert boxed_format(["q"] * 3, [r"so \boxed{4}", r"\boxed{}", "4"]) == [1.0, 0.0, 0.0]
    completions = [" 42\n", "-3.5.", "1,000", "42 apples", "x = 4"]
    assert answer_only_format(["q"] * 5, completions) == [1.0, 1.0, 1.0, 0.0, 0.0]


# --- registry ---


def test_builtins_registered_and_loadable() -> None:
    for name in ["math_accuracy", "integer_match", "think_answer_format", "boxed_format"]:
        assert load_reward_function(name) is REWARD_FUNCTIONS[name]
    assert load_reward_function("swarmrl.rewards.math:integer_match") is integer_match


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown reward function 'accuracy'") as info:
        load_reward_function("accuracy")
    assert "math_accuracy" in str(info.value) and "integer_match" in str(info.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_package_xyz.rewards:f", "cannot import module 'no_such_package_xyz.rewards'"),
        ("swarmrl.rewards.math:no_such_function", "has no 'no_such_function'"),
        ("swarmrl.rewards.math:PARSE_TIMEOUT_S", "not callable"),
        ("swarmrl.rewards.math:", "expected 'package.module:function'"),
        (":integer_match", "expected 'package.module:function'"),
    ],
)
def test_bad_import_paths(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_reward_function(spec)


def test_user_function_by_import_path(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompts, completions, **kwargs):\n"
        "    return [1.0 if len(c) < 5 else 0.0 for c in completions]\n"
    )
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('bad module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    short = load_reward_function("my_rewards:short")
    assert short(["q", "q"], ["ok", "far too long"], completion_ids=[[1], [2]]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="RuntimeError: bad module"):
        load_reward_function("broken_rewards:short")


# --- scoring ---


def constant(value: object):
    return lambda prompts, completions, **kwargs: [value] * len(completions)


def test_score_completions_weights_and_none() -> None:
    def gold_only(prompts, completions, answer, **kwargs):
        return [None if a is None else 1.0 for a in answer]

    functions = [("one", constant(1.0), 0.5), ("gold", gold_only, 2.0)]
    scores = score_completions(functions, ["p", "p"], ["a", "b"], {"answer": ["1", None]})
    assert scores == Scores(
        total=[2.5, 0.5],
        per_function={"one": [1.0, 1.0], "gold": [1.0, None]},
        errors={},
    )
    only_none = score_completions([("none", constant(None), 1.0)], ["p"], ["a"], {})
    assert only_none.total == [0.0]


def test_trl_functions_that_take_only_the_completions_are_called_by_keyword() -> None:
    from tests.trl_rewards import reward_len  # TRL's quickstart: def reward_len(completions, ...)

    scores = score_completions([("len", reward_len, 1.0)], ["p", "p"], ["x" * 20, "x" * 30], {})
    assert scores.errors == {} and scores.total == [0.0, -0.5]


def test_score_completions_nan_counts_as_none() -> None:
    scores = score_completions([("nan", constant(math.nan), 1.0)], ["p"], ["a"], {})
    assert scores.per_function == {"nan": [None]} and scores.total == [0.0]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (lambda prompts, completions, **kwargs: 1 / 0, "ZeroDivisionError: division by zero"),
        (lambda prompts, completions, **kwargs: [1.0], "returned 1 rewards for 2 completions"),
        (constant("1.0"), "returned a str, not a number"),
    ],
)
def test_failing_function_scores_none_and_run_goes_on(bad, error: str, caplog) -> None:
    functions = [("bad", bad, 1.0), ("good", constant(1.0), 3.0)]
    with caplog.at_level(logging.WARNING, logger="swarmrl.rewards.scoring"):
        columns = {"completion_ids": [[1], [2]]}
        scores = score_completions(functions, ["p", "p"], ["a", "b"], columns)
    assert error in scores.errors["bad"] and "good" not in scores.errors
    assert scores.per_function["bad"] == [None, None]
    assert scores.total == [3.0, 3.0]
    assert "bad" in caplog.text and error in caplog.text


def test_score_completions_with_builtins() -> None:
    functions = [
        ("accuracy", load_reward_function("math_accuracy"), 1.0),
        ("format", load_reward_function("think_answer_format"), 0.5),
    ]
    completions = ["<think>1+1</think><answer>2</answer>", "it is 3"]
    columns = {"answer": ["2", "2"], "completion_ids": [[1, 2], [3]], "source": ["a", "b"]}
    scores = score_completions(functions, ["1+1?", "1+1?"], completions, columns)
    assert scores.total == [1.5, 0.0] and scores.errors == {}
