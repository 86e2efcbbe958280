"""The worker's copy of the weights the trainer published: what every delta is replayed on.

It lives on the CPU in the dtype the codec publishes (protocol/codecs: the trainer's dtype, or
bf16 for `sparse`), whatever the inference engine runs in, so replaying a delta gives the same
bits on any worker and the engine only ever loads a copy. A keyframe replaces it. A delta
must start from the version this worker holds; the copy of version 0 is read from the model
folder the first time a delta arrives, and again when a worker without a copy (-1, after a
refused or failed update) is sent the chain from version 0. After each replay the copy must
match the announced fingerprint; if it does not (drift) the copy is dropped and the worker
asks for a keyframe. With LoRA (`adapter_scale`), the published weights are the adapters:
the engine gets the model folder's weights with them merged in (base/adapters.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from swarmrl.base.adapters import merge
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
    def __init__(self, model_folder: str, dtype: str, adapter_scale: float | None = None) -> None:
        self.model_folder = model_folder
        self.dtype = dtype  # the trainer's dtype, from the run spec
        self.adapter_scale = adapter_scale  # LoRA: the published tensors are adapters
        self.tensors: dict[str, torch.Tensor] | None = None
        self._base: dict[str, torch.Tensor] | None = None  # LoRA: the frozen base

    def engine_weights(self) -> dict[str, torch.Tensor]:
        """What the engine runs: the published weights, or the base with the adapters merged."""
        assert self.tensors is not None
        if self.adapter_scale is None:
            return self.tensors
        if self._base is None:
            self._base = base_weights(self.model_folder, self.dtype)
        try:
            return merge(self._base, self.tensors, self.adapter_scale)
        except ValueError as error:
            raise NeedKeyframe(f"adapters do not fit the model: {error}") from None

    def apply(
        self, update: m.WeightUpdate, payload: bytes | memoryview, held_version: int
    ) -> dict[str, torch.Tensor]:
        """The published weights after `update`; PayloadError leaves the copy as it was."""
        if update.base_version < 0:  # a keyframe
            self.tensors = decode_full(payload, update.fingerprint)
            return self.engine_weights()
        try:
            codec = get_codec(update.codec)
        except ConfigError as error:
            raise NeedKeyframe(str(error)) from None
        rebuild = held_version < 0 and update.base_version == 0  # from the base weights
        if update.base_version != held_version and not rebuild:
            raise NeedKeyframe(
                f"delta {update.base_version}->{update.version} but this worker holds "
                f"version {held_version}"
            )
        if self.tensors is None or rebuild:
            if update.base_version != 0:
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
        return self.engine_weights()


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
