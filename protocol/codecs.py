"""Weight payloads: how a set of model weights becomes bytes on the wire and back.

Codec `full` is a keyframe: every trainable parameter (tied weights once) as safetensors
bytes, in the trainer's dtype, so a worker that loads it holds exactly the trainer's weights.
The fingerprint is the SHA-256 of the payload; a worker checks it before touching its model.
(Compressed update codecs build on this module.)
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class PayloadError(ValueError):
    """A weight payload that cannot be applied; the worker's weights are left as they were."""


def fingerprint(payload: bytes | memoryview) -> str:
    return hashlib.sha256(payload).hexdigest()


def encode_full(model: Any) -> bytes:
    """All trainable parameters of `model` as safetensors bytes (contiguous CPU copies)."""
    from safetensors.torch import save

    tensors = {
        name: parameter.detach().to("cpu").contiguous()
        for name, parameter in model.named_parameters()
    }
    return save(tensors)


def decode_full(payload: bytes | memoryview, expected_fingerprint: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    actual = fingerprint(payload)
    if actual != expected_fingerprint:
        raise PayloadError(
            f"weight payload fingerprint mismatch: got {actual[:12]}, "
            f"announced {expected_fingerprint[:12]} (truncated or corrupted)"
        )
    try:
        return load(bytes(payload))
    except (SafetensorError, ValueError) as error:
        raise PayloadError(f"weight payload is not valid safetensors: {error}") from None
