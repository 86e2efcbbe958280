"""Atomic checkpoints: `<run>/checkpoints/step_N/` is either complete or absent.

A checkpoint is a normal Hugging Face model folder (so `swarmrl eval`, transformers and vLLM load
it directly) plus `optimizer.pt` and `trainer_state.json` (step, the prompt stream's position
and the prompts still owed, see `LeaseBook.state`). It is written into a hidden staging folder
(`.step_N.*`), flushed to disk and renamed into place, so a crash, a kill -9 or a full disk
mid-write leaves every earlier checkpoint as it was; a failed write raises CheckpointError
naming the file, and the staging folder is removed (also any left by a killed process).
Loading reads and checks every file of the newest checkpoint before anything is applied; a
checkpoint that fails is named with the file at fault, moved aside to `step_N.unreadable` (so
neither a later resume nor the `keep` pruning mistakes it for the newest), and the one before
is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarmrl.base.adapters import checkpoint_names
from swarmrl.base.models import load_parameters_in_place

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
_STEP = re.compile(r"^step_(\d+)$")
_STATE_KEYS = ("step", "leases", "history")
Restore = Callable[[dict[str, Any], dict[str, Any]], None]


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message names the file."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint that does not fit this run's model or optimizer (another config)."""


def save_checkpoint(
    folder: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer_state: dict,
    state: dict,
    keep: int,
    weights: dict[str, Any] | None = None,
) -> Path:
    """Write `folder/step_N` atomically and prune to the newest `keep`; CheckpointError if not.

    `weights`: the full tensors to write instead of the model's own (a sharded trainer's,
    gathered on rank 0); `optimizer_state` is `optimizer.state_dict()` or its gathered form."""
    _remove_unfinished(folder)
    target = folder / f"step_{step}"
    staging: Path | None = None
    writing = str(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".step_{step}.", dir=folder))
        writing = "model weights (model*.safetensors)"
        model.save_pretrained(staging, state_dict=weights)
        writing = "tokenizer files"
        tokenizer.save_pretrained(staging)
        writing = OPTIMIZER_FILE
        _torch_save(optimizer_state, staging / OPTIMIZER_FILE)
        writing = STATE_FILE
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
        writing = "(flushing to disk)"
        _sync_tree(staging)
        writing = f"(renaming into {target.name})"
        if target.exists():  # the same step again: swap, so a crash leaves one of the two
            replaced = Path(tempfile.mkdtemp(prefix=f".step_{step}.replaced.", dir=folder))
            os.replace(target, replaced / target.name)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(replaced / target.name, target)
                raise
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(staging, target)
        _sync_dir(folder)
    except Exception as error:
        space = _free_space(folder)  # before the staging folder is removed: a full disk shows
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {target}: {writing}: {type(error).__name__}: "
            f"{error}{space}"
        ) from error
    except BaseException:
        if staging is not None:
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


def load_latest(
    folder: Path, model: Any, optimizer: Any, restore: Restore | None = None
) -> dict | None:
    """Restore the newest readable checkpoint into model and optimizer; return its state."""
    _remove_unfinished(folder)
    for path in reversed(checkpoints(folder)):
        try:
            return load_checkpoint(path, model, optimizer, restore)
        except CheckpointMismatch:  # an older checkpoint would not fit either
            raise
        except CheckpointError as error:  # a damaged checkpoint must not stop the resume
            aside = _set_aside(path)
            log.error("%s; moved it aside to %s and trying the previous checkpoint", error, aside)
    return None


def load_checkpoint(path: Path, model: Any, optimizer: Any, restore: Restore | None = None) -> dict:
    """Read and check every file, then restore model and optimizer. CheckpointError if a file
    is damaged, CheckpointMismatch if it is another model's or optimizer's; either way before
    the model or the optimizer was touched. `restore(tensors, optimizer_state)` replaces the
    in-place load (a sharded trainer's rank 0 hands them to every rank)."""
    state, tensors, optimizer_state = read_checkpoint(path)
    hint = "resume with the run's own config (its config.toml)"
    names = checkpoint_names(model)  # a LoRA model's checkpoint holds its adapters
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise CheckpointMismatch(
            f"checkpoint {path} does not fit this model: its safetensors files lack "
            f"{len(missing)} of the model's tensors (e.g. {missing[0]}); {hint}"
        )
    saved_groups = [len(g["params"]) for g in optimizer_state["param_groups"]]
    own_groups = [len(g["params"]) for g in optimizer.state_dict()["param_groups"]]
    if saved_groups != own_groups:
        raise CheckpointMismatch(
            f"checkpoint {path} does not fit this run: {path / OPTIMIZER_FILE} holds parameter "
            f"groups of sizes {saved_groups}, this run's optimizer {own_groups}; {hint}"
        )
    fitting = {names[k]: v for k, v in tensors.items() if k in names}
    if restore is not None:
        restore(fitting, optimizer_state)
    else:
        try:
            load_parameters_in_place(model, fitting, trainable=hasattr(model, "peft_config"))
        except ValueError as error:  # checked before any parameter is written
            detail = f"checkpoint {path} does not fit this model: {error}"
            raise CheckpointMismatch(detail) from None
        optimizer.load_state_dict(optimizer_state)
    log.info("resumed from %s (step %d)", path, state["step"])
    return state


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(trainer state, model tensors, optimizer state dict) of one checkpoint, or
    CheckpointError naming the file that is missing, truncated or not what it should be."""
    import torch
    from safetensors.torch import load_file

    def damaged(file: Path | str, error: Exception | str) -> CheckpointError:
        detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return CheckpointError(f"checkpoint {path} is unreadable: {file}: {detail}")

    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise damaged(file, error) from None
    if not isinstance(state, dict) or any(key not in state for key in _STATE_KEYS):
        raise damaged(file, f"not a trainer state (needs the keys {', '.join(_STATE_KEYS)})")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise damaged(path / "model.safetensors", "no safetensors file")
    index = path / "model.safetensors.index.json"  # a sharded model names its shards
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise damaged(index, error) from None
        for shard in sorted(shards - {file.name for file in files}):
            raise damaged(path / shard, "missing (listed in model.safetensors.index.json)")
    tensors: dict = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except Exception as error:  # safetensors raises its own error type
            raise damaged(file, error) from None
    file = path / OPTIMIZER_FILE
    try:
        optimizer_state = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as error:  # unpickling garbage raises many kinds of errors
        raise damaged(file, error) from None
    groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, dict) else None
    if not isinstance(groups, list) or any(
        not isinstance(g, dict) or "params" not in g for g in groups
    ):
        raise damaged(file, "not an optimizer state dict")
    return state, tensors, optimizer_state


def _torch_save(value: Any, path: Path) -> None:
    """torch.save, but a failed write raises the OSError (ENOSPC, EFBIG, EIO) that caused it:
    torch itself reports only "unexpected pos"."""
    import torch

    with open(path, "wb") as file:
        sink = _Sink(file)
        try:
            torch.save(value, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            with contextlib.suppress(OSError):  # the buffered rest cannot be written either
                file.close()
            raise sink.error from None


class _Sink:
    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def _free_space(folder: Path) -> str:
    try:
        return f" ({shutil.disk_usage(folder).free / 1e6:.0f} MB left on that disk)"
    except OSError:
        return ""


def _set_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.unreadable")
    number = 1
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.name}.unreadable-{number}")
    try:
        os.replace(path, aside)
    except OSError as error:
        log.error("could not move %s aside: %s", path, error)
        return path
    return aside


def _remove_unfinished(folder: Path) -> None:
    """Staging folders of a save that was killed: only one trainer writes a run's checkpoints."""
    if not folder.is_dir():
        return
    for leftover in folder.glob(".step_*"):
        if ".replaced." in leftover.name:  # killed between the two renames of a re-save
            for kept in leftover.glob("step_*"):
                if not (folder / kept.name).exists():
                    os.replace(kept, folder / kept.name)
        shutil.rmtree(leftover, ignore_errors=True)
        log.info("removed %s, left by an interrupted checkpoint save", leftover)


def _sync_tree(folder: Path) -> None:
    """fsync every file and the folder: the rename must not reach the disk before the data."""
    for file in folder.rglob("*"):
        if file.is_file():
            descriptor = os.open(file, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    _sync_dir(folder)


def _sync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
