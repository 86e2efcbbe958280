"""The trainer's prompt stream: tasks (question + gold answer), prompt text, and token ids.

A task source is an indexable, deterministic sequence: item `i` of a seed is always the same
question, so a resumed run continues exactly where it stopped. Two sources:
- `arithmetic`: `a op b` questions generated from the seed, with a held-out set disjoint from
  the training stream;
- `huggingface`: any `datasets.load_dataset` dataset (for example `openai/gsm8k`), shuffled by
  the seed and cycled in epochs; `data.data_files` points at local files for offline use.
  TRL's formats load as they are: a `prompt` column of text (standard) or of chat messages
  (conversational, with its own system message), no answer column needed; every other column
  goes to the reward functions.
Prompt text comes from `prompt_template`, wrapped in the tokenizer's chat template for
instruct models (after the system prompt and the few-shot `examples`; in a multi-turn run, as
the environment opens the episode, with its tools' schemas) or used as is for base models.
"""

from __future__ import annotations

import functools
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from swarmrl.base.config import DataConfig
from swarmrl.environments import Environment

OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
}


TRL_PROMPT = "prompt"


@dataclass(frozen=True)
class Task:
    """One question (or TRL conversation) with its gold answer; `columns` go to the rewards."""

    question: str | list[dict[str, Any]]
    answer: str
    columns: dict[str, Any] = field(default_factory=dict)


class ArithmeticTasks:
    """`a op b` questions, item i derived from (seed, i); held-out questions never train."""

    def __init__(self, config: DataConfig, heldout_size: int) -> None:
        self.config = config
        space = self._space_size()
        if space < 2 * heldout_size:
            raise ValueError(
                f"data: only {space} distinct questions; the held-out set ({heldout_size}) may "
                "take at most half: widen data.first_operand / data.second_operand or shrink "
                "eval.heldout_size"
            )
        self.heldout: list[Task] = []
        self._heldout_questions: set[str] = set()
        attempt = 0
        while len(self.heldout) < heldout_size:  # distinct questions, so none counts twice
            task = self._make(f"heldout:{config.seed}:{attempt}")
            attempt += 1
            if task.question not in self._heldout_questions:
                self.heldout.append(task)
                self._heldout_questions.add(task.question)

    def _space_size(self) -> int:
        (a_low, a_high), (b_low, b_high) = self.config.first_operand, self.config.second_operand
        return (a_high - a_low + 1) * (b_high - b_low + 1) * len(set(self.config.operations))

    def _make(self, key: str) -> Task:
        rng = random.Random(key)
        a = rng.randint(*self.config.first_operand)
        b = rng.randint(*self.config.second_operand)
        op = rng.choice(self.config.operations)
        question = f"What is {a} {op} {b}?"
        return Task(question=question, answer=str(OPERATIONS[op](a, b)))

    def train(self, index: int) -> Task:
        attempt = 0
        while True:
            task = self._make(f"train:{self.config.seed}:{index}:{attempt}")
            if task.question not in self._heldout_questions:
                return task
            attempt += 1


class DatasetTasks:
    """Rows of a Hugging Face dataset; the train split is reshuffled by the seed every epoch."""

    def __init__(self, config: DataConfig, heldout_size: int) -> None:
        import datasets

        self.config = config
        loaded = datasets.load_dataset(config.path, config.subset, data_files=config.data_files)
        missing = {config.train_split, config.heldout_split} - set(loaded)
        if missing:
            raise ValueError(
                f"data: dataset {config.path!r} has no split(s) {sorted(missing)}; "
                f"it has {sorted(loaded)}"
            )
        self.rows = loaded[config.train_split]
        names = self.rows.column_names
        # TRL's formats: a `prompt` column of text or of chat messages, no answer column needed.
        self.question_field = config.question_field
        if self.question_field not in names and TRL_PROMPT in names:
            self.question_field = TRL_PROMPT
        self.answer_field = config.answer_field if config.answer_field in names else None
        if self.question_field not in names or (
            self.answer_field is None and self.question_field != TRL_PROMPT
        ):
            missing = (
                config.question_field if self.question_field not in names else config.answer_field
            )
            raise ValueError(
                f"data: dataset {config.path!r} has no column {missing!r} (nor TRL's "
                f"{TRL_PROMPT!r}); columns are {names}"
            )
        held = loaded[config.heldout_split]
        self.heldout = [self._task(held[i]) for i in range(min(heldout_size, len(held)))]

    def _task(self, row: dict[str, Any]) -> Task:
        raw = "" if self.answer_field is None else str(row[self.answer_field])
        if self.config.answer_format == "gsm8k":
            from swarmrl.rewards.math import gsm8k_gold_answer

            answer = gsm8k_gold_answer(raw)
        else:
            answer = raw.strip()
        question = row[self.question_field]
        if not is_conversation(question):
            question = str(question)
        skip = {self.answer_field, TRL_PROMPT if self.question_field == TRL_PROMPT else None}
        columns = {k: v for k, v in row.items() if k not in skip}
        return Task(question=question, answer=answer, columns=columns)

    def train(self, index: int) -> Task:
        epoch, position = divmod(index, len(self.rows))
        return self._task(self.rows[self._order(epoch)[position]])

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one cache per loaded dataset is the intent)
    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"{self.config.seed}:{epoch}").shuffle(order)
        return order


def load_tasks(config: DataConfig, heldout_size: int) -> ArithmeticTasks | DatasetTasks:
    if config.source == "arithmetic":
        return ArithmeticTasks(config, heldout_size)
    return DatasetTasks(config, heldout_size)


def is_conversation(value: Any) -> bool:
    """TRL's conversational format: a list of {"role", "content"} messages."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def prompt_text(
    config: DataConfig,
    tokenizer: Any,
    question: str | list[dict[str, Any]],
    environment: Environment | None = None,
) -> str:
    """The exact text the model continues: chat template for instruct models, else plain. A
    conversation (TRL's format, its own system message included) goes through the chat
    template as it is; an `environment` opens the episode from the messages."""
    if is_conversation(question):
        messages = list(question)
    else:
        user = config.prompt_template.format(question=question)
        if not config.use_chat_template:
            return user if config.system_prompt is None else f"{config.system_prompt}\n\n{user}"
        system = [] if config.system_prompt is None else [config.system_prompt]
        messages = [{"role": "system", "content": text} for text in system]
        messages += [*config.examples, {"role": "user", "content": user}]
    if tokenizer.chat_template is None:
        raise ValueError(
            "data: chat messages need a tokenizer with a chat template; "
            "set data.use_chat_template = false for a base model"
        )
    tools = None
    if environment is not None:
        messages = environment.initial_messages(messages)
        tools = environment.tool_schemas() or None
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )


def prompt_token_ids(config: DataConfig, tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt text; the chat template already holds the special tokens."""
    return tokenizer(text, add_special_tokens=not config.use_chat_template)["input_ids"]
