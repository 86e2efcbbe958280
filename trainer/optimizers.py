"""The trainer's optimizers, and what each one publishes to the workers after a step.

- `adamw`: torch AdamW. Published in any codec that encodes a change of weights: `full` (every
  weight: the reference, and every keyframe) or `sparse` (the bf16 elements that changed).
- `demo`: DeMo-style (Peng, Quesnelle, Kingma 2024). Momentum `m = decay*m + lr*g`; the top-k
  DCT coefficients of every block of m are the payload (protocol/codecs/decoupled_momentum.py);
  `m -=` what they stand for (error feedback); then the payload itself is replayed on the
  trainer's weights, exactly as every worker will replay it: the update is the message. Its
  step takes the gradients in and clears them (`.grad = None`) before it transforms any
  tensor, so they are not held alongside the transforms' temporaries.

`Publication` turns the weights after each step into a `Published` version: the delta in the
chosen codec, a keyframe, and the fingerprint of the weights a worker holds afterwards.
(This module imports torch: the CLI imports it only when a run starts.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from swarmrl.base.config import TrainerConfig
from swarmrl.protocol.codecs import decoupled_momentum as demo
from swarmrl.protocol.codecs.full import encode_full
from swarmrl.protocol.codecs.interface import WeightCodec, weights_fingerprint
from swarmrl.trainer.publish import Delta, Published


class DemoOptimizer(torch.optim.Optimizer):
    def __init__(
        self,
        named_parameters: list[tuple[str, torch.nn.Parameter]],
        lr: float,
        weight_decay: float,
        decay: float,
        settings: demo.DemoSettings,
    ) -> None:
        self.names = [name for name, _ in named_parameters]
        super().__init__(
            [p for _, p in named_parameters],
            {"lr": lr, "weight_decay": weight_decay, "decay": decay},
        )
        self.settings = settings
        self.last_payload: bytes | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        group = self.param_groups[0]
        tensors = dict(zip(self.names, group["params"], strict=True))
        for parameter in tensors.values():
            momentum = self.state[parameter].setdefault("momentum", torch.zeros_like(parameter))
            momentum.mul_(group["decay"])
            if parameter.grad is not None:
                momentum.add_(parameter.grad, alpha=group["lr"])
                parameter.grad = None  # taken in: freed before the DCTs' temporaries are made
        selections = {}
        for name, parameter in tensors.items():
            momentum = self.state[parameter]["momentum"]
            selection = demo.select(momentum, self.settings)
            momentum.sub_(
                demo.dense(selection, tuple(parameter.shape), self.settings.chunk).to(momentum)
            )
            selections[name] = selection
        shapes = {name: tuple(p.shape) for name, p in tensors.items()}
        payload = demo.encode(selections, shapes, self.settings, group["lr"], group["weight_decay"])
        demo.apply_update(payload, tensors)
        self.last_payload = payload


def make_optimizer(model: Any, trainer: TrainerConfig) -> torch.optim.Optimizer:
    if trainer.optimizer == "demo":
        settings = demo.DemoSettings(
            topk=trainer.demo.topk, chunk=trainer.demo.chunk, value_bits=trainer.demo.value_bits
        )
        return DemoOptimizer(
            [(n, p) for n, p in model.named_parameters() if p.requires_grad],
            lr=trainer.learning_rate,
            weight_decay=trainer.weight_decay,
            decay=trainer.demo.decay,
            settings=settings,
        )
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],  # the adapters alone, with LoRA
        lr=trainer.learning_rate,
        weight_decay=trainer.weight_decay,
        betas=(trainer.adam_beta1, trainer.adam_beta2),
    )


class Publication:
    """What the workers are sent for each version, in the run's codec (protocol/codecs)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        codec: WeightCodec,
        keyframe_interval: int = 1,
        keyframe_due: Callable[[int], bool] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.codec = codec
        self.keyframe_interval = keyframe_interval  # versions between keyframes (with deltas)
        self.keyframe_due = keyframe_due or (lambda version: False)
        self.previous: dict[str, torch.Tensor] | None = None  # if the codec diffs versions
        self.last_keyframe = -(10**9)

    def published(
        self, version: int, weights: dict[str, torch.Tensor], after_step: bool = True
    ) -> Published:
        """Version `version`: `weights` are every trainable tensor, whole (gathered if sharded);
        `after_step` False for the first one (no delta). A keyframe (the whole weights as
        bytes: the biggest thing a trainer holds) is made only for a version that needs one:
        the first, every one the codec sends no delta for, every `keyframe_interval`-th, and
        those `keyframe_due` names."""
        current = self.codec.publishable(weights)
        delta = None
        if after_step:
            payload = self.codec.encode(self.previous, current, self.optimizer)
            delta = None if payload is None else Delta(self.codec.name, payload)
        if self.codec.keeps_previous:
            self.previous = current
        keyframe = None
        if (
            delta is None
            or version - self.last_keyframe >= self.keyframe_interval
            or self.keyframe_due(version)
        ):
            keyframe, self.last_keyframe = encode_full(current), version
        return Published(version, weights_fingerprint(current), keyframe, delta)
