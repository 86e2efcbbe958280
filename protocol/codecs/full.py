"""The `full` codec: every published tensor as safetensors bytes. It is also every keyframe.

Every trainable parameter (tied weights once), so a worker that loads it holds exactly the
weights the trainer published. As a run's codec it sends no deltas: each version reaches the
workers as a keyframe (the reference against which the compressed codecs are measured).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from swarmrl.protocol.codecs.interface import (
    PayloadError,
    Tensors,
    WeightCodec,
    check_fingerprint,
)

if TYPE_CHECKING:
    import torch


def encode_full(tensors: Tensors) -> bytes:
    """`tensors` (e.g. a model's named parameters) as safetensors bytes."""
    from safetensors.torch import save

    return save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})


def decode_full(payload: bytes | memoryview, expected_fingerprint: str) -> dict[str, torch.Tensor]:
    """The tensors of a keyframe, checked against the fingerprint it was announced with."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(bytes(payload))
    except (SafetensorError, ValueError) as error:
        raise PayloadError(f"weight payload is not valid safetensors: {error}") from None
    check_fingerprint(tensors, expected_fingerprint)
    return tensors


class FullWeights(WeightCodec):
    name = "full"

    def encode(self, previous: Tensors | None, current: Tensors, optimizer: Any) -> None:
        return None  # no deltas: the keyframe is the update

    def apply(self, payload: bytes | memoryview, tensors: Tensors) -> None:
        raise PayloadError("the full codec sends keyframes (base_version -1), never deltas")
