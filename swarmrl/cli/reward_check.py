"""`swarmrl rewards test FUNCTION`: run a reward function on samples and show what it returns.

FUNCTION is a registered name (`integer_match`) or an import path (`mypkg.rewards:my_reward`).
The samples come from a JSONL file (`--samples`: one object per line with `prompt`,
`completion` and any dataset columns, such as `answer`) or are generated fresh
(`--generate N`): N completions of the recipe's model for the first prompts of the recipe's
prompt stream, sampled with its settings (`num_generations` per prompt) or greedy. The function
is called in batches of one submission (`num_generations` x `swarm.prompts_per_lease`) unless
`--batch-size` says otherwise; rewards/trial.py runs it and writes the report. Exit status: 0,
1 if a call raised, 2 for what training could never use (a value that is not a number, a list
of the wrong length, an unknown function, unreadable samples).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from swarmrl.base.config import Config
from swarmrl.base.recipes import load_config

Samples = tuple[list[str], list[str], dict[str, list[Any]]]  # prompts, completions, columns


def add_parser(commands: Any, override_help: str) -> None:
    rewards = commands.add_parser("rewards", help="check a reward function before a run")
    actions = rewards.add_subparsers(dest="rewards_command", required=True)
    test = actions.add_parser(
        "test",
        help="run a reward function on samples: distribution, None, errors, time, examples",
        epilog=override_help,
    )
    test.add_argument("function", help="registered name (integer_match) or pkg.module:function")
    source = test.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--samples",
        type=Path,
        metavar="FILE.jsonl",
        help="one JSON object per line: prompt, completion and any columns (answer, ...)",
    )
    source.add_argument(
        "--generate",
        type=int,
        metavar="N",
        help="N fresh completions of the recipe's model for the recipe's prompts",
    )
    test.add_argument(
        "--recipe", help="recipe for --generate and the batch size (default: arithmetic)"
    )
    test.add_argument(
        "--greedy",
        action="store_true",
        help="--generate greedily, one completion per prompt (default: sampled, "
        "num_generations per prompt)",
    )
    test.add_argument("--batch-size", type=int, help="samples per call (default: one submission)")
    test.add_argument("--examples", type=int, default=2, help="examples shown per score")
    rewards.set_defaults(handler=run, overrides_allowed=True)


def run(arguments: argparse.Namespace) -> int:
    from swarmrl.rewards import load_reward_function
    from swarmrl.rewards.trial import try_reward

    try:
        config = load_config(arguments.recipe, arguments.overrides)
        function = load_reward_function(arguments.function)
        if arguments.samples is not None:
            prompts, completions, columns = read_samples(arguments.samples)
        else:
            prompts, completions, columns = generate(config, arguments.generate, arguments.greedy)
        size = arguments.batch_size or config.sampling.num_generations * (
            config.swarm.prompts_per_lease
        )
        trial = try_reward(arguments.function, function, prompts, completions, columns, size)
    except (ValueError, OSError) as error:  # ConfigError, RewardContractError too
        print(f"swarmrl: {error}", file=sys.stderr)
        return 2
    print(trial.report(arguments.examples))
    return 1 if trial.failures else 0


def read_samples(path: Path) -> Samples:
    """A JSONL file's prompts, completions and other columns (None where a row lacks one)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON: {error}") from None
        if not isinstance(row, dict) or not all(
            isinstance(row.get(key), str) for key in ("prompt", "completion")
        ):
            raise ValueError(f"{path}:{number}: needs string fields 'prompt' and 'completion'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no samples")
    names = sorted({key for row in rows for key in row} - {"prompt", "completion"})
    columns = {name: [row.get(name) for row in rows] for name in names}
    return [row["prompt"] for row in rows], [row["completion"] for row in rows], columns


def generate(config: Config, count: int, greedy: bool) -> Samples:
    """`count` completions of the recipe's model, with the columns training would pass."""
    import torch

    from swarmrl.base.generation import Generator
    from swarmrl.base.models import load_model, load_tokenizer, pick_device
    from swarmrl.trainer.data import load_tasks, prompt_text, prompt_token_ids

    if count < 1:
        raise ValueError("--generate needs at least 1 completion")
    sampling = config.sampling
    print(f"swarmrl: loading {config.model.name}", file=sys.stderr)
    model = load_model(
        config.model.name, dtype=config.model.dtype, device=pick_device(config.model.device)
    )
    tokenizer = load_tokenizer(config.model.name)
    generator = Generator(model, tokenizer)
    tasks = load_tasks(config.data, 0)
    per_prompt = 1 if greedy else sampling.num_generations
    rows = [tasks.train(i) for i in range(math.ceil(count / per_prompt)) for _ in range(per_prompt)]
    rows = rows[:count]
    texts = [prompt_text(config.data, tokenizer, task.question) for task in rows]
    ids = [prompt_token_ids(config.data, tokenizer, text) for text in texts]
    torch.manual_seed(config.trainer.seed)
    samples = []
    for start in range(0, count, config.eval.batch_size):
        batch = ids[start : start + config.eval.batch_size]
        if greedy:
            samples += generator.greedy(batch, sampling.max_completion_length, sampling.stop)
        else:
            samples += generator.sample(
                batch,
                sampling.max_completion_length,
                sampling.stop,
                sampling.temperature,
                sampling.top_p,
                sampling.top_k,
            )
    columns = {"answer": [task.answer for task in rows]}
    columns |= {key: [task.columns.get(key) for task in rows] for key in rows[0].columns}
    columns["completion_ids"] = [sample.token_ids for sample in samples]
    return texts, [sample.text for sample in samples], columns
