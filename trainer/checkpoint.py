"""Atomic checkpoints: `<run>/checkpoints/step_N/` is either complete or absent.

A checkpoint is a normal Hugging Face model folder (so `swarmrl eval`, transformers and vLLM load
it directly) plus `optimizer.pt` and `trainer_state.json` (step, policy version, the prompt
stream's position and the prompts still owed). It is written into a hidden temporary folder and
renamed into place, so a crash or a full disk mid-write leaves the previous checkpoint as the
latest one. Loading skips (and names) a checkpoint that fails to read and uses the one before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
_STEP = re.compile(r"^step_(\d+)$")


def save_checkpoint(
    folder: Path, step: int, model: Any, tokenizer: Any, optimizer: Any, state: dict, keep: int
) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step_{step}"
    staging = Path(tempfile.mkdtemp(prefix=f".step_{step}.", dir=folder))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name))]
    return [path for _, path in sorted(found)]


def load_latest(folder: Path, model: Any, optimizer: Any) -> dict | None:
    """Restore the newest readable checkpoint into model and optimizer; return its state."""
    for path in reversed(checkpoints(folder)):
        try:
            return load_checkpoint(path, model, optimizer)
        except Exception as error:  # a damaged checkpoint must not stop the resume
            log.error("checkpoint %s is unreadable (%s); trying the previous one", path, error)
    return None


def load_checkpoint(path: Path, model: Any, optimizer: Any) -> dict:
    import torch
    from safetensors.torch import load_file

    from swarmrl.rollout.hf_backend import load_parameters_in_place

    state = json.loads((path / STATE_FILE).read_text())
    tensors = load_file(str(path / "model.safetensors"))
    names = {name for name, _ in model.named_parameters()}
    load_parameters_in_place(model, {k: v for k, v in tensors.items() if k in names})
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))
    log.info("resumed from %s (step %d)", path, state["step"])
    return state
