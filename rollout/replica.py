"""The worker's copy of the weights the trainer published: what every delta is replayed on.

It lives on the CPU in the dtype the codec publishes (protocol/codecs: the trainer's dtype, or
bf16 for `sparse`), whatever the inference engine runs in, so replaying a delta gives the same
bits on any worker and the engine only ever loads a copy. A keyframe replaces it. A delta
must start from the version this worker holds; the copy of version 0 is read from the model
folder the first time a delta arrives. After each replay the copy must match the announced
fingerprint; if it does not (drift) the copy is dropped and the worker asks for a keyframe.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from swarmrl.base.config import ConfigError
from swarmrl.protocol import messages as m
from swarmrl.protocol.codecs import get_codec
from swarmrl.protocol.codecs.full import decode_full
from swarmrl.protocol.codecs.interface import PayloadError, check_fingerprint

if TYPE_CHECKING:
    import torch


class NeedKeyframe(PayloadError):
    """This worker cannot replay the update; only full weights help now."""


class Replica:
    def __init__(self, model_folder: str, dtype: str) -> None:
        self.model_folder = model_folder
        self.dtype = dtype  # the trainer's dtype, from the run spec
        self.tensors: dict[str, torch.Tensor] | None = None

    def apply(
        self, update: m.WeightUpdate, payload: bytes | memoryview, held_version: int
    ) -> dict[str, torch.Tensor]:
        """The published weights after `update`; PayloadError leaves the copy as it was."""
        if update.base_version < 0:  # a keyframe
            self.tensors = decode_full(payload, update.fingerprint)
            return self.tensors
        try:
            codec = get_codec(update.codec)
        except ConfigError as error:
            raise NeedKeyframe(str(error)) from None
        if update.base_version != held_version or held_version < 0:
            raise NeedKeyframe(
                f"delta {update.base_version}->{update.version} but this worker holds "
                f"version {held_version}"
            )
        if self.tensors is None:
            if held_version != 0:
                raise NeedKeyframe("no copy of the published weights to replay on")
            self.tensors = base_weights(self.model_folder, codec.published_dtype(self.dtype))
        codec.apply(payload, self.tensors)
        try:
            check_fingerprint(self.tensors, update.fingerprint)
        except PayloadError as error:
            self.tensors = None
            raise NeedKeyframe(
                f"drifted from the trainer at version {update.version}: {error}"
            ) from None
        return self.tensors


def base_weights(model_folder: str, dtype: str) -> dict[str, torch.Tensor]:
    """Every tensor in the folder's safetensors files, in `dtype` (version 0 of a run)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(Path(model_folder).glob("*.safetensors"))
    if not files:
        raise NeedKeyframe(f"no safetensors files in {model_folder}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return {name: t.to(getattr(torch, dtype)).contiguous() for name, t in tensors.items()}
