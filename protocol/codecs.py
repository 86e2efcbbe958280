"""Weight payloads: how a set of model weights becomes bytes on the wire and back.

Codec `full` is a keyframe: every trainable parameter (tied weights once) as safetensors
bytes, so a worker that loads it holds exactly the weights the trainer published. Every
update, keyframe or delta (protocol/demo.py, protocol/sparse.py), names the weights it leads
to by `weights_fingerprint`: SHA-256 over names, dtypes, shapes and raw bytes in sorted-name
order, the same value whichever codec carried them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class PayloadError(ValueError):
    """A weight payload that cannot be applied; the worker's weights are left as they were."""


def weights_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensors[name].shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def encode_full(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """`tensors` (e.g. a model's named parameters) as safetensors bytes."""
    from safetensors.torch import save

    return save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})


def decode_full(payload: bytes | memoryview, expected_fingerprint: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(bytes(payload))
    except (SafetensorError, ValueError) as error:
        raise PayloadError(f"weight payload is not valid safetensors: {error}") from None
    check_fingerprint(tensors, expected_fingerprint)
    return tensors


def check_fingerprint(tensors: Mapping[str, torch.Tensor], expected: str) -> None:
    actual = weights_fingerprint(tensors)
    if actual != expected:
        raise PayloadError(
            f"weights fingerprint mismatch: got {actual[:12]}, announced {expected[:12]}"
        )
