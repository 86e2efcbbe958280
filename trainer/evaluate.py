"""Held-out greedy accuracy: the number a run is judged by, before and after training.

Greedy decoding of every held-out prompt, scored with the recipe's accuracy reward (the first
reward function unless `eval.accuracy_reward` names another). In a multi-turn run every
prompt is a greedy episode with the run's environment, and the reward scores its conversation.
Used by the trainer at the start and end of a run and by `swarmrl eval CHECKPOINT`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarmrl.base.config import Config
from swarmrl.base.generation import Generator
from swarmrl.environments import make_environment
from swarmrl.environments.episode import run_episodes
from swarmrl.rewards import load_reward_function, score_completions
from swarmrl.trainer.data import Task, prompt_text, prompt_token_ids


@dataclass
class EvalResult:
    accuracy: float
    count: int
    mean_completion_tokens: float
    mean_model_turns: float
    # (question, gold answer, completion; an episode's messages joined by " | ") for the log
    examples: list[tuple[str, str, str]]


def accuracy_function(config: Config) -> tuple[str, Any]:
    name = config.eval.accuracy_reward or config.rewards[0].function
    return name, load_reward_function(name)


def evaluate(
    model: Any, tokenizer: Any, tasks: list[Task], config: Config, synced_gpus: bool = False
) -> EvalResult:
    """Greedy held-out accuracy; `synced_gpus` when every rank of a sharded model runs it."""
    if not tasks:
        return EvalResult(float("nan"), 0, 0.0, 0.0, examples=[])
    generator = Generator(model, tokenizer, synced_gpus)
    name, function = accuracy_function(config)
    environment = None if config.environment is None else make_environment(config.environment)
    prompts = [prompt_text(config.data, tokenizer, task.question, environment) for task in tasks]
    completions: list[Any] = []
    texts: list[str] = []
    lengths: list[int] = []
    turns: list[int] = []
    size, limit, stop = (
        config.eval.batch_size,
        config.eval.max_completion_length,
        config.sampling.stop,
    )
    for start in range(0, len(tasks), size):
        batch = [prompt_token_ids(config.data, tokenizer, p) for p in prompts[start : start + size]]
        if environment is None:
            for sample in generator.greedy(batch, limit, stop):
                lengths.append(len(sample.token_ids))
                turns.append(1)
                completions.append(sample.text)
                texts.append(sample.text)
            continue
        episodes = run_episodes(
            environment,
            tokenizer,
            batch,
            lambda ids, budget: generator.greedy(ids, budget, []),
            limit,
            {tokenizer.eos_token_id},
        )
        for episode in episodes:
            lengths.append(len(episode.token_ids))
            turns.append(episode.model_turns)
            completions.append(episode.conversation)
            texts.append(" | ".join(message["content"] for message in episode.conversation))
    columns = {"answer": [task.answer for task in tasks]}
    for key in tasks[0].columns:
        columns[key] = [task.columns.get(key) for task in tasks]
    scores = score_completions([(name, function, 1.0)], prompts, completions, columns)
    correct = [1.0 if value == 1.0 else 0.0 for value in scores.per_function[name]]
    examples = [(t.question, t.answer, c) for t, c in zip(tasks[:3], texts[:3], strict=True)]
    return EvalResult(
        accuracy=sum(correct) / len(tasks),
        count=len(tasks),
        mean_completion_tokens=sum(lengths) / len(lengths),
        mean_model_turns=sum(turns) / len(turns),
        examples=examples,
    )
