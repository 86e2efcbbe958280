"""`swarmrl export CHECKPOINT --out DIR`: a checkpoint as a plain model folder to share or serve.

A LoRA run's checkpoint holds peft adapters (adapter_config.json names the base model): export
merges them into the base (peft's `merge_and_unload`) and writes one full Hugging Face model
folder that transformers and vLLM load without peft. A full fine-tuning checkpoint is written
without its optimizer and trainer state. Either way the tokenizer comes along.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"


def add_parser(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="a checkpoint as a plain model folder (LoRA adapters merged in)"
    )
    export.add_argument("checkpoint", type=Path, help="runs/NAME/checkpoints/step_N")
    export.add_argument("--out", type=Path, required=True, help="the model folder to write")
    export.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights"
    )
    export.set_defaults(handler=run, overrides_allowed=False)


def run(arguments: argparse.Namespace) -> int:
    source, out = arguments.checkpoint, arguments.out
    if not (source / ADAPTER_CONFIG).is_file() and not (source / "config.json").is_file():
        print(
            f"swarmrl: {source}: not a checkpoint (no config.json or adapter_config.json)",
            file=sys.stderr,
        )
        return 2
    if out.exists() and any(out.iterdir()):
        print(f"swarmrl: {out} exists and is not empty; choose a new folder", file=sys.stderr)
        return 2
    try:
        merged = export(source, out, arguments.dtype)
    except (OSError, ValueError, ImportError) as error:
        print(f"swarmrl: cannot export {source}: {error}", file=sys.stderr)
        return 2
    kind = "adapters merged into the base" if merged else "full weights"
    print(f"swarmrl: exported {source} ({kind}) to {out}")
    return 0


def export(source: Path, out: Path, dtype: str) -> bool:
    """Write `source` as a model folder at `out`; True when LoRA adapters were merged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = (source / ADAPTER_CONFIG).is_file()
    if merged:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
        model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return merged
