"""Where the trainer's memory goes: RSS after each phase of a step, for AdamW and for demo.

Builds the trainer's real objects in one process (`TrainingRun.load` with the default recipe
and the local_swarm benchmark's settings: 1-digit addition, 4 prompts x 8 completions of 32
tokens, micro-batches of 16), then runs the phases of a run in the loop's order: the first
publication (version 0's keyframe), the screening forward of a new worker's groups, three
steps (`ranks.step`) each followed by its publication (`Publication.published`, in the run's
codec: `full` for AdamW, so every version is a keyframe; `demo` for demo), a checkpoint
after the second. Every optimizer runs in a child process of its own, so each peak is its own.

Per phase: RSS at its end and the peak during it (a sampler thread reading /proc/self/statm
every 2 ms), and `ru_maxrss` (the kernel's high-water mark) so far. Also the sizes the step's
logits imply (micro-batch x tokens x vocab x 4 bytes) and the weights, gradients and
optimizer state.

    python benchmarks/trainer_memory.py [--optimizers adamw,demo] [--steps 3]

Prints a table and writes benchmarks/results/trainer_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from processes import MB, Sampler

RESULTS = Path(__file__).resolve().parent / "results" / "trainer_memory.json"
SETTINGS = [  # benchmarks/local_swarm.py's (its 1-digit task), on the default recipe
    "--model.gradient_checkpointing",  # as TRL's GRPOConfig by default, and local_swarm
    "true",
    "--data.first_operand",
    "[0, 9]",
    "--eval.heldout_size",
    "16",
    "--trainer.prompts_per_step",
    "4",
    "--sampling.num_generations",
    "8",
    "--sampling.max_completion_length",
    "32",
    "--logging.report_to",
    "none",
]
LEARNING_RATES = {"adamw": "1e-5", "demo": "5e-5"}


def batch(run: Any, version: int, seed: int) -> list[Any]:
    """4 groups of 8 completions of 32 random tokens, with the model's own log-probs (so they
    pass the log-prob check and all train) and a reward spread in every group."""
    import torch

    from swarmrl.trainer.buffer import ScoredGroup
    from swarmrl.trainer.data import prompt_text, prompt_token_ids
    from swarmrl.trainer.grpo import sequence_logprobs_from_logits
    from swarmrl.trainer.step import Sequence, completion_logits, pad_batch

    config, tokenizer = run.config, run.tokenizer
    generator = torch.Generator().manual_seed(seed)
    groups = []
    for index in range(config.trainer.prompts_per_step):
        question = run.tasks.train(index).question
        text = prompt_text(config.data, tokenizer, question)
        prompt = prompt_token_ids(config.data, tokenizer, text)
        size, width = config.sampling.num_generations, config.sampling.max_completion_length
        ids = torch.randint(0, len(tokenizer), (size, width), generator=generator).tolist()
        sequences = [Sequence(prompt, c, [0.0] * width, 0.0) for c in ids]
        padded = pad_batch(sequences, run.pad_id, "cpu")
        with torch.no_grad():
            logits = completion_logits(run.model, padded)
            own = sequence_logprobs_from_logits(logits, padded["completion_ids"], 1.0).tolist()
        del logits
        rewards = [float(k % 2) for k in range(size)]
        groups.append(ScoredGroup(index, prompt, ids, own, rewards, "w0", version))
    return groups


def measure(optimizer: str, steps: int) -> dict[str, Any]:
    """Run the phases for one optimizer in this process; the rows and the sizes."""
    sampler = Sampler()
    import torch

    from swarmrl.base.recipes import load_config
    from swarmrl.protocol.codecs import codec_for
    from swarmrl.trainer.optimizers import Publication
    from swarmrl.trainer.publish import WeightPublisher
    from swarmrl.trainer.ranks import make_ranks
    from swarmrl.trainer.run import TrainingRun
    from swarmrl.trainer.step import screen_groups

    sampler.phase("import torch + swarmrl")
    overrides = [*SETTINGS, "--trainer.optimizer", optimizer]
    overrides += ["--trainer.learning_rate", LEARNING_RATES[optimizer]]
    config = load_config(None, overrides)
    folder = Path(tempfile.mkdtemp(prefix="trainer_memory."))
    try:
        torch.manual_seed(config.trainer.seed)
        run = TrainingRun.load(config, folder, make_ranks(config), resume=False)
        sampler.phase("load model, optimizer, data")
        codec = codec_for(config.trainer)
        swarm = config.swarm
        publication = Publication(
            run.optimizer, codec, keyframe_interval=max(1, swarm.update_history // 2)
        )
        publisher = WeightPublisher(
            publication.published(0, run.ranks.full_weights(run.model), after_step=False),
            swarm.update_history,
            swarm.keyframe_every,
        )
        publication.keyframe_due = publisher.keyframe_due
        sampler.phase("publish version 0 (keyframe)")
        groups = batch(run, 0, seed=0)
        sampler.phase("build the batch")
        screen_groups(run.model, groups, config, run.pad_id, 0)
        sampler.phase("screen the batch (forward, no grad)")
        for step in range(1, steps + 1):
            stats, _ = run.ranks.step(run, batch(run, step - 1, seed=step), None)
            run.step = step
            sampler.phase(f"step {step} (forward, backward, optimizer)")
            publisher.publish(publication.published(step, run.ranks.full_weights(run.model)))
            sampler.phase(f"publish version {step} ({codec.name})")
            if step == 2:
                run.save({}, run.ranks.full_weights(run.model))
                sampler.phase("checkpoint")
        run.finish({}, interrupted=False)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    parameters = sum(p.numel() for p in trainable)
    rows = config.trainer.micro_batch_size * config.sampling.max_completion_length
    vocab = run.model.config.vocab_size
    state = sum(
        t.numel() * t.element_size()
        for s in run.optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    return {
        "optimizer": optimizer,
        "codec": codec.name,
        "phases": sampler.rows,
        "peak_mb": max(row["maxrss_mb"] for row in sampler.rows),
        "sizes_mb": {
            "weights": round(parameters * 4 / MB),
            "gradients": round(parameters * 4 / MB),
            "optimizer_state": round(state / MB),
            "keyframe": round(parameters * 4 / MB),
            "micro_batch_logits": round(rows * vocab * 4 / MB),
        },
        "loss": stats["loss"],
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'phase':<44}" + "".join(f"{r['optimizer']:>28}" for r in results)]
    lines.append(f"{'':<44}" + f"{'RSS / peak in phase / maxrss':>28}" * len(results))
    for k, row in enumerate(results[0]["phases"]):
        cells = []
        for result in results:
            other = result["phases"][k] if k < len(result["phases"]) else None
            cells.append(
                f"{other['rss_mb']:>10} {other['phase_peak_mb']:>8} {other['maxrss_mb']:>8}"
                if other
                else f"{'':>28}"
            )
        lines.append(f"{row['phase']:<44}" + "".join(cells))
    lines.append(f"{'peak RSS (MB)':<44}" + "".join(f"{r['peak_mb']:>28}" for r in results))
    for key in results[0]["sizes_mb"]:
        sizes = "".join(f"{r['sizes_mb'][key]:>28}" for r in results)
        lines.append(f"{'  ' + key + ' (MB)':<44}" + sizes)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default="adamw,demo")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps)))
        return
    results = []
    for optimizer in args.optimizers.split(","):
        command = [sys.executable, __file__, "--child", optimizer, "--steps", str(args.steps)]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(done.stdout.splitlines()[-1]))
    print(table(results))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"steps": args.steps, "results": results}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
