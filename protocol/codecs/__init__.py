"""Weight codecs: the registry, and the codec a run's trainer settings choose.

Each codec is one file behind `interface.WeightCodec`; adding one is that file plus one line
in CODECS. The trainer's publication, the worker's replica, the log-prob check and the config
check all look codecs up here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarmrl.base.config import ConfigError
from swarmrl.protocol.codecs.decoupled_momentum import DecoupledMomentum
from swarmrl.protocol.codecs.full import FullWeights
from swarmrl.protocol.codecs.interface import WeightCodec
from swarmrl.protocol.codecs.sparse import SparseBf16

if TYPE_CHECKING:
    from swarmrl.base.config import TrainerConfig

CODECS: dict[str, WeightCodec] = {
    codec.name: codec for codec in (FullWeights(), SparseBf16(), DecoupledMomentum())
}
KEYFRAME = FullWeights.name  # the codec of every keyframe, and of a run that sends no deltas


def get_codec(name: str) -> WeightCodec:
    codec = CODECS.get(name)
    if codec is None:
        raise ConfigError(f"unknown weight codec {name!r}; registered: {', '.join(CODECS)}")
    return codec


def codec_for(trainer: TrainerConfig) -> WeightCodec:
    """The codec `trainer.weight_codec` names, else the optimizer's own, else `full`; checked
    against the optimizer and the codec's own settings (ConfigError naming the key)."""
    own = [codec for codec in CODECS.values() if codec.optimizer == trainer.optimizer]
    name = trainer.weight_codec or (own[0].name if own else KEYFRAME)
    try:
        codec = get_codec(name)
    except ConfigError as error:
        raise ConfigError(f"trainer.weight_codec: {error}") from None
    if own and codec not in own:
        raise ConfigError(
            f"trainer.weight_codec: the {trainer.optimizer} optimizer sends its own step; "
            f"use {' or '.join(c.name for c in own)} (or leave weight_codec unset)"
        )
    if codec.optimizer not in (None, trainer.optimizer):
        raise ConfigError(
            f"trainer.weight_codec: {codec.name} carries the {codec.optimizer} optimizer's "
            f"step; set trainer.optimizer = {codec.optimizer!r}"
        )
    try:
        codec.check(trainer)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return codec
