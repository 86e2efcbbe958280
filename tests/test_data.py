"""Tests for swarmrl.trainer.data: arithmetic and dataset task sources, prompt text, token ids."""

import json
import re
from pathlib import Path
from typing import Any

import pytest

from swarmrl.base.config import DataConfig
from swarmrl.trainer.data import (
    ArithmeticTasks,
    DatasetTasks,
    Task,
    load_tasks,
    prompt_text,
    prompt_token_ids,
)

QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


# --- arithmetic ---------------------------------------------------------------------------


def test_arithmetic_items_are_pinned_per_seed() -> None:
    # item i of a seed must never change: a resumed run continues the same stream
    tasks = ArithmeticTasks(DataConfig(), heldout_size=128)
    assert [tasks.train(i) for i in range(3)] == [
        Task("What is 69 + 6?", "75"),
        Task("What is 18 + 9?", "27"),
        Task("What is 84 + 9?", "93"),
    ]
    assert tasks.heldout[:2] == [Task("What is 15 + 6?", "21"), Task("What is 14 + 3?", "17")]
    other = ArithmeticTasks(DataConfig(seed=1), heldout_size=128)
    assert [other.train(i).question for i in range(3)] == [
        "What is 59 + 6?",
        "What is 30 + 7?",
        "What is 27 + 6?",
    ]


def test_arithmetic_is_deterministic_and_random_access() -> None:
    config = DataConfig(operations=["+", "-", "*"], seed=7)
    first, second = ArithmeticTasks(config, 16), ArithmeticTasks(config, 16)
    forward = [first.train(i) for i in range(50)]
    backward = [second.train(i) for i in reversed(range(50))][::-1]
    assert forward == backward
    assert first.heldout == second.heldout
    assert len({task.question for task in forward}) > 40  # not one question repeated


def test_heldout_never_appears_in_training_stream() -> None:
    config = DataConfig()  # 90 * 10 = 900 questions, 128 distinct ones held out
    tasks = ArithmeticTasks(config, heldout_size=128)
    heldout = {task.question for task in tasks.heldout}
    assert len(tasks.heldout) == 128
    assert len(heldout) == 128
    training = {tasks.train(i).question for i in range(3000)}
    assert training.isdisjoint(heldout)
    # 772 questions are allowed; 3000 draws with replacement reach 753 of them (pinned)
    assert len(training) == 753


def test_small_space_trains_only_on_what_heldout_leaves() -> None:
    # 1 + 0 and 2 + 0: one held out, so every training item is the other one
    config = DataConfig(first_operand=(1, 2), second_operand=(0, 0))
    tasks = ArithmeticTasks(config, heldout_size=1)
    (held,) = tasks.heldout
    other = {"What is 1 + 0?", "What is 2 + 0?"} - {held.question}
    assert {tasks.train(i).question for i in range(20)} == other


def test_arithmetic_answers_are_correct() -> None:
    config = DataConfig(operations=["+", "-", "*"], first_operand=(0, 20), second_operand=(0, 30))
    tasks = ArithmeticTasks(config, heldout_size=8)
    seen = set()
    for task in [tasks.train(i) for i in range(300)] + tasks.heldout:
        a, op, b = QUESTION.fullmatch(task.question).groups()
        a, b = int(a), int(b)
        assert 0 <= a <= 20 and 0 <= b <= 30
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert task.answer == str(expected)
        seen.add(op)
    assert seen == {"+", "-", "*"}
    assert any(task.answer.startswith("-") for task in map(tasks.train, range(300)))


def test_heldout_exhausting_the_question_space_is_an_error() -> None:
    config = DataConfig(first_operand=(1, 2), second_operand=(0, 0))  # 2 questions
    with pytest.raises(ValueError, match="only 2 distinct questions"):
        ArithmeticTasks(config, heldout_size=50)


def test_zero_heldout() -> None:
    tasks = ArithmeticTasks(DataConfig(first_operand=(3, 3), second_operand=(4, 4)), 0)
    assert tasks.heldout == []
    assert tasks.train(5) == Task("What is 3 + 4?", "7")


def test_duplicate_operations_do_not_hide_an_exhausted_space() -> None:
    config = DataConfig(operations=["+", "+"], first_operand=(1, 1), second_operand=(0, 0))
    with pytest.raises(ValueError):
        ArithmeticTasks(config, heldout_size=5)  # the only question, 1 + 0, is held out


def test_load_tasks_picks_the_source() -> None:
    assert isinstance(load_tasks(DataConfig(), 4), ArithmeticTasks)


# --- a Hugging Face dataset from local JSONL ----------------------------------------------


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def gsm8k_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    import datasets  # imported here: ~1 s, only the dataset tests pay it

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    train = [
        {"question": f"Q{i}?", "answer": f"Step {i}.\n#### {i},00{i}", "id": i} for i in range(5)
    ]
    test = [
        {"question": "T0?", "answer": "#### 1,234", "id": 100},
        {"question": "T1?", "answer": "So $5.\n#### 5", "id": 101},
        {"question": "T2?", "answer": "#### -3", "id": 102},
    ]
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", train),
        "test": write_jsonl(tmp_path / "test.jsonl", test),
    }


def gsm8k_config(files: dict[str, str], **changes: Any) -> DataConfig:
    return DataConfig(
        source="huggingface",
        path="json",
        data_files=files,
        answer_format="gsm8k",
        **changes,
    )


def test_dataset_heldout_and_gsm8k_answers(gsm8k_files: dict[str, str]) -> None:
    tasks = DatasetTasks(gsm8k_config(gsm8k_files), heldout_size=2)
    assert tasks.heldout == [
        Task("T0?", "1234", {"question": "T0?", "id": 100}),
        Task("T1?", "5", {"question": "T1?", "id": 101}),
    ]
    assert len(DatasetTasks(gsm8k_config(gsm8k_files), heldout_size=10).heldout) == 3


def test_dataset_train_items_and_epochs(gsm8k_files: dict[str, str]) -> None:
    tasks = load_tasks(gsm8k_config(gsm8k_files), 0)
    assert isinstance(tasks, DatasetTasks)
    assert tasks.train(0) == Task("Q2?", "2002", {"question": "Q2?", "id": 2})
    order = [tasks.train(i).question for i in range(10)]
    # each epoch is a permutation of the 5 rows, reshuffled per epoch (pinned for seed 0)
    assert order[:5] == ["Q2?", "Q3?", "Q1?", "Q0?", "Q4?"]
    assert order[5:] == ["Q3?", "Q0?", "Q2?", "Q4?", "Q1?"]
    again = DatasetTasks(gsm8k_config(gsm8k_files), 0)
    assert [again.train(i).question for i in reversed(range(10))][::-1] == order
    reseeded = DatasetTasks(gsm8k_config(gsm8k_files, seed=1), 0)
    assert [reseeded.train(i).question for i in range(5)] == ["Q0?", "Q4?", "Q1?", "Q2?", "Q3?"]


def test_dataset_plain_answers_are_stripped(gsm8k_files: dict[str, str]) -> None:
    config = DataConfig(source="huggingface", path="json", data_files=gsm8k_files)
    tasks = DatasetTasks(config, heldout_size=1)
    assert tasks.heldout[0].answer == "#### 1,234"


def test_dataset_missing_column(gsm8k_files: dict[str, str]) -> None:
    config = gsm8k_config(gsm8k_files, question_field="problem")
    with pytest.raises(ValueError) as caught:
        DatasetTasks(config, 2)
    message = str(caught.value)
    assert "dataset 'json' has no column 'problem'" in message
    assert "['question', 'answer', 'id']" in message


def test_dataset_missing_split(gsm8k_files: dict[str, str]) -> None:
    config = gsm8k_config({"train": gsm8k_files["train"]})
    with pytest.raises(ValueError) as caught:
        DatasetTasks(config, 2)
    assert str(caught.value) == "data: dataset 'json' has no split(s) ['test']; it has ['train']"


# --- prompt text and token ids ------------------------------------------------------------


class FakeTokenizer:
    chat_template: str | None = "{{ messages }}"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> str:
        self.calls.append((messages, kwargs))
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return body + "<assistant>"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        self.calls.append((text, add_special_tokens))
        ids = [ord(ch) for ch in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_prompt_text_plain_without_system_prompt() -> None:
    config = DataConfig(use_chat_template=False, prompt_template="Q: {question}\nA:")
    assert prompt_text(config, None, "What is 2 + 3?") == "Q: What is 2 + 3?\nA:"


def test_prompt_text_plain_with_system_prompt() -> None:
    config = DataConfig(
        use_chat_template=False, system_prompt="Be brief.", prompt_template="{question} Go."
    )
    tokenizer = FakeTokenizer()
    assert prompt_text(config, tokenizer, "What is 2 + 3?") == "Be brief.\n\nWhat is 2 + 3? Go."
    assert tokenizer.calls == []  # the chat template is not used


def test_prompt_text_chat_template() -> None:
    config = DataConfig(system_prompt="Be brief.", prompt_template="{question} Go.")
    tokenizer = FakeTokenizer()
    text = prompt_text(config, tokenizer, "What is 2 + 3?")
    assert text == "<system>Be brief.</system><user>What is 2 + 3? Go.</user><assistant>"
    assert tokenizer.calls == [
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 3? Go."},
            ],
            {"tools": None, "tokenize": False, "add_generation_prompt": True},
        )
    ]


def test_prompt_text_chat_template_without_system_prompt() -> None:
    tokenizer = FakeTokenizer()
    assert prompt_text(DataConfig(), tokenizer, "Hi?") == "<user>Hi?</user><assistant>"
    assert tokenizer.calls[0][0] == [{"role": "user", "content": "Hi?"}]


def test_prompt_text_base_model_without_chat_template() -> None:
    tokenizer = FakeTokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"set data\.use_chat_template = false for a base model"):
        prompt_text(DataConfig(), tokenizer, "Hi?")


def test_prompt_token_ids_special_tokens_only_without_chat_template() -> None:
    tokenizer = FakeTokenizer()
    assert prompt_token_ids(DataConfig(), tokenizer, "ab") == [97, 98]
    assert prompt_token_ids(DataConfig(use_chat_template=False), tokenizer, "ab") == [1, 97, 98]
    assert tokenizer.calls == [("ab", False), ("ab", True)]


def test_gsm8k_recipe_loads_offline_from_a_local_fixture(tmp_path, monkeypatch) -> None:
    """The shipped GSM8K recipe, pointed at local files in the GSM8K format (no Hub)."""
    from pathlib import Path

    from swarmrl.base.recipes import load_config
    from swarmrl.rewards import load_reward_function
    from swarmrl.trainer.data import load_tasks

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    fixtures = Path(__file__).parent / "fixtures"
    config = load_config(
        "gsm8k",
        [
            "--data.path",
            "json",
            "--data.data_files",
            f'{{train = "{fixtures}/gsm8k_train.jsonl", test = "{fixtures}/gsm8k_test.jsonl"}}',
        ],
    )
    tasks = load_tasks(config.data, config.eval.heldout_size)
    assert [task.answer for task in tasks.heldout] == ["18", "3"]
    assert sorted(tasks.train(i).answer for i in range(3)) == ["10", "5000", "72"]
    accuracy = load_reward_function(config.eval.accuracy_reward)
    question = tasks.heldout[0].question
    completions = ["She sells 9 eggs, so she makes \\boxed{18} dollars.", "The answer is 16."]
    assert accuracy([question] * 2, completions, answer=["18", "18"]) == [1.0, 0.0]


# --- TRL's dataset formats drop in ----------------------------------------------------------


def trl_config(tmp_path: Path, rows: list[dict[str, Any]]) -> DataConfig:
    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", rows) for split in ("train", "test")}
    return DataConfig(source="huggingface", path="json", data_files=files)


def test_trl_conversational_prompts_load_as_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    conversation = [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "What is 2 + 3?"},
    ]
    rows = [{"prompt": conversation, "solution": "5", "level": 1}] * 3
    tasks = DatasetTasks(trl_config(tmp_path, rows), heldout_size=1)
    task = tasks.train(0)
    assert task.question == conversation and task.answer == ""
    assert task.columns == {"solution": "5", "level": 1}  # what the rewards read
    tokenizer = FakeTokenizer()
    text = prompt_text(DataConfig(), tokenizer, task.question)
    assert text == "<system>Answer with a number.</system><user>What is 2 + 3?</user><assistant>"
    assert tokenizer.calls[0][1] == {
        "tools": None,
        "tokenize": False,
        "add_generation_prompt": True,
    }


def test_trl_standard_prompts_are_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = [{"prompt": "The sky is", "ground_truth": "blue"}] * 2
    task = DatasetTasks(trl_config(tmp_path, rows), heldout_size=1).train(1)
    assert task.question == "The sky is" and task.columns == {"ground_truth": "blue"}
    plain = DataConfig(use_chat_template=False)  # as TRL uses a standard prompt: raw text
    assert prompt_text(plain, None, task.question) == "The sky is"
