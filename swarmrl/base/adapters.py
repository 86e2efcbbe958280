"""LoRA: the trainer trains adapters on a frozen base; workers merge the same adapters in.

With `model.use_peft` the trainer wraps its model with peft's LoRA (`add_adapters`): only
the adapter matrices train, so gradients and optimizer state shrink to them, and the frozen
base is also the reference policy for the KL term (`AdaptersOff`: no second model). What a
run publishes, and workers hold, is the adapters: a keyframe is a few MB, deltas are the
codec's encoding of the adapters' change. A worker keeps the base weights of the model
folder and hands its engine `merge(base, adapters, scale)`: W + scale * B @ A for every
adapted matrix, in the replica's dtype. Names follow peft's: `base_model.model.<module>.
lora_A.default.weight` adapts `<module>.weight`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from swarmrl.base.config import ModelConfig

PREFIX = "base_model.model."
SUFFIXES = {"A": ".lora_A.default.weight", "B": ".lora_B.default.weight"}


def add_adapters(model: Any, config: ModelConfig) -> Any:
    """`model` wrapped with LoRA adapters (peft), only they trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise RuntimeError("model.use_peft needs peft: pip install peft") from error
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def adapter_scale(config: ModelConfig) -> float | None:
    """alpha / r, what workers multiply B @ A by; None without LoRA."""
    return config.lora_alpha / config.lora_r if config.use_peft else None


class AdaptersOff:
    """The frozen base of a LoRA model, called like a model: the reference policy."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, **inputs: Any) -> Any:
        with self.model.disable_adapter():
            return self.model(**inputs)


def checkpoint_names(model: Any) -> dict[str, str]:
    """Tensor name in a checkpoint folder -> the model's parameter name, for every parameter a
    checkpoint holds: all of a plain model's; a LoRA model's adapters, which peft saves
    without the adapter's name (`lora_A.weight`), so `PeftModel.from_pretrained` reads them."""
    parameters = [(n, p) for n, p in model.named_parameters()]
    if not hasattr(model, "peft_config"):
        return {name: name for name, _ in parameters}
    return {n.replace(".default.", "."): n for n, p in parameters if p.requires_grad}


def adapted(name: str) -> tuple[str, str] | None:
    """(`<module>.weight` of the base, "A" or "B") for an adapter tensor's name, else None."""
    for part, suffix in SUFFIXES.items():
        if name.startswith(PREFIX) and name.endswith(suffix):
            return name[len(PREFIX) : -len(suffix)] + ".weight", part
    return None


def merge(
    base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """The base weights with every adapter pair merged in (a new dict; `base` is untouched).
    ValueError if an adapter does not fit the base (another model, a missing half)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in adapters.items():
        target = adapted(name)
        if target is None:
            raise ValueError(f"{name} is not a LoRA adapter tensor")
        pairs.setdefault(target[0], {})[target[1]] = tensor
    merged = dict(base)
    for weight, pair in pairs.items():
        if weight not in base or set(pair) != {"A", "B"}:
            raise ValueError(f"adapter for {weight}: no such base weight, or half of it missing")
        a, b, w = pair["A"], pair["B"], base[weight]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(f"adapter for {weight} has shape {b.shape[0]}x{a.shape[1]}")
        delta = (b.double() @ a.double()) * scale
        merged[weight] = (w.double() + delta).to(w.dtype)
        merged[weight] = merged[weight].contiguous()
    return merged
