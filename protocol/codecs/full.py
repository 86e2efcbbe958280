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
    """`tensors` (e.g. a model's named parameters) as safetensors bytes: the bytes
    `safetensors.torch.save` makes, built in one allocation (it makes two more of the whole
    size on the way, and a keyframe is the biggest thing a trainer holds)."""
    import json

    import torch
    from safetensors.torch import save

    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    # safetensors' own order and dtype names, read from the header of empty stand-ins.
    empty = save({name: t.new_empty(0) for name, t in flat.items()})
    layout = json.loads(empty[8 : 8 + int.from_bytes(empty[:8], "little")])
    header, offset = {}, 0
    for name, spec in layout.items():
        size, shape = flat[name].numel() * flat[name].element_size(), list(flat[name].shape)
        header[name] = {
            "dtype": spec["dtype"],
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    data = (memoryview(flat[name].reshape(-1).view(torch.uint8).numpy()) for name in layout)
    return b"".join([len(text).to_bytes(8, "little"), text, *data])


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
