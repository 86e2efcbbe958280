"""Each loss variant, and LoRA, on the default recipe for the same number of steps.

One `swarmrl run` per row (trainer + 2 local workers, the default recipe, the same seed),
back to back on this machine: held-out greedy accuracy before and after, seconds per step,
the trainer process's peak RSS (sampled every second), and the bytes of each weight update.

    python benchmarks/training_options.py --steps 10 [--rows dapo,lora] [--keep]
Prints a table and writes benchmarks/results/training_options.json; run folders are deleted
afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from processes import watch

RESULTS = Path(__file__).parent / "results"
ROWS = {
    "dapo (default)": [],
    "grpo": ["--trainer.loss_type", "grpo"],
    "dr_grpo": ["--trainer.loss_type", "dr_grpo"],
    "bnpo": ["--trainer.loss_type", "bnpo"],
    "cispo": ["--trainer.loss_type", "cispo", "--trainer.epsilon_high", "5.0"],
    "sapo": ["--trainer.loss_type", "sapo"],
    "gspo": [
        "--trainer.loss_type",
        "grpo",
        "--trainer.importance_sampling_level",
        "sequence",
        "--trainer.epsilon",
        "3e-4",
        "--trainer.epsilon_high",
        "4e-4",
    ],
    "dapo + delta 4": ["--trainer.delta", "4.0"],
    "lora r16": ["--model.use_peft", "true"],
    "lora r16, lr 2e-4": ["--model.use_peft", "true", "--trainer.learning_rate", "2e-4"],
}


def run(name: str, extra: list[str], steps: int, heldout: int, folder: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "swarmrl",
        "run",
        "--trainer.max_steps",
        str(steps),
        "--trainer.max_minutes",
        "60",
        "--checkpoint.every_steps",
        "0",
        "--eval.heldout_size",
        str(heldout),
        "--swarm.hand_over_s",
        "0",
        "--logging.run_dir",
        str(folder),
        "--logging.run_name",
        slug(name),
        *extra,
    ]
    usage = watch(command, folder / f"{slug(name)}.console.log")
    lines = [
        json.loads(x) for x in (folder / slug(name) / "metrics.jsonl").read_text().splitlines()
    ]
    train = [x for x in lines if x["kind"] == "train"]
    evals = [x for x in lines if x["kind"] == "eval"]
    return {
        "heldout_before": evals[0]["accuracy"],
        "heldout_after": evals[-1]["accuracy"],
        "seconds_per_step": sum(x["step_seconds"] for x in train) / len(train),
        "trainer_peak_rss_mb": usage["trainer_peak_rss_mb"],
        "update_bytes": sorted({x["update_bytes"] for x in train}),
        "wall_seconds": round(usage["wall_s"]),
    }


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--heldout", type=int, default=128)
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    names = list(ROWS) if not args.rows else [n.strip() for n in args.rows.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="swarmrl-options-"))
    results = {}
    try:
        for name in names:
            results[name] = run(name, ROWS[name], args.steps, args.heldout, folder)
            row = results[name]
            print(
                f"{name:22} {row['heldout_before']:.3f} -> {row['heldout_after']:.3f}  "
                f"{row['seconds_per_step']:5.1f} s/step  {row['trainer_peak_rss_mb']:5d} MB  "
                f"{row['update_bytes']} B/update",
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    out = {"steps": args.steps, "heldout": args.heldout, "rows": results}
    (RESULTS / "training_options.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
