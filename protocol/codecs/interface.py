"""The weight-codec interface: how a trainer's step reaches a worker's copy of the weights.

A codec has a name (the `codec` field of a WeightUpdate), the dtype it publishes the weights
in, a trainer side (`publishable`, then `encode` the step from one published version to the
next) and a worker side (`apply` a payload to the replica, in place, checking everything
first), plus `check` for the settings it needs. Every update names the weights it leads to by
`weights_fingerprint`, whichever codec carried them. Codecs are registered in __init__.py.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from swarmrl.base.config import TrainerConfig

Tensors = Mapping[str, "torch.Tensor"]


class PayloadError(ValueError):
    """A weight payload that cannot be applied; the worker's weights are left as they were."""


class WeightCodec(ABC):
    name: ClassVar[str]
    # The optimizer whose own step this codec's payload is (the update is the message), or
    # None for a codec that encodes any optimizer's change of the weights.
    optimizer: ClassVar[str | None] = None
    # Whether `encode` needs the previous version's published weights (the trainer keeps them).
    keeps_previous: ClassVar[bool] = False

    def published_dtype(self, trainer_dtype: str) -> str:
        """The dtype a worker's replica holds the weights in."""
        return trainer_dtype

    def publishable(self, weights: Tensors) -> dict[str, torch.Tensor]:
        """The trainer's weights as they are published (in `published_dtype`)."""
        return dict(weights)

    def check(self, trainer: TrainerConfig) -> None:  # noqa: B027 (most codecs need nothing)
        """Raise ValueError naming the setting a run with this codec cannot have."""

    @abstractmethod
    def encode(self, previous: Tensors | None, current: Tensors, optimizer: Any) -> bytes | None:
        """The payload that turns version v-1 (`previous`, if `keeps_previous`) into v; None when
        this codec sends no deltas (workers get keyframes)."""

    @abstractmethod
    def apply(self, payload: bytes | memoryview, tensors: Tensors) -> None:
        """Replay `payload` on `tensors` in place; PayloadError (nothing touched) if it is bad."""


def weights_fingerprint(tensors: Tensors) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes in sorted-name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensors[name].shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def check_fingerprint(tensors: Tensors, expected: str) -> None:
    actual = weights_fingerprint(tensors)
    if actual != expected:
        raise PayloadError(
            f"weights fingerprint mismatch: got {actual[:12]}, announced {expected[:12]}"
        )


def shapes_of(tensors: Tensors) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def layout_hash(shapes: Mapping[str, tuple[int, ...]]) -> bytes:
    """8 bytes naming a model's tensor names and shapes: a payload for another model is refused."""
    text = "\n".join(f"{name}:{tuple(shapes[name])}" for name in sorted(shapes))
    return hashlib.sha256(text.encode()).digest()[:8]
