"""Config values that name a pluggable part, checked against that part's registry.

The config tree (base layer) cannot know the registries above it; the command line can. After
a recipe loads, `check_choices` looks up the weight codec (protocol/codecs) and the workers'
backend (rollout/backends), and that a `logging.report_to` target is installed, so a typo or a
missing package fails at once, naming the file and the key, not after the model has loaded.
`Registered` gives argparse a registry's names without importing it until they are needed
(`--help`, or a bad value).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

from swarmrl.base.config import Config, ConfigError


def check_choices(config: Config) -> None:
    from swarmrl.protocol.codecs import codec_for
    from swarmrl.rollout.backends import backend_names

    try:
        codec_for(config.trainer)
        if config.swarm.backend not in backend_names():
            raise ConfigError(
                f"swarm.backend: unknown backend {config.swarm.backend!r}; "
                f"choose one of {', '.join(backend_names())}"
            )
        if "wandb" in config.logging.report_to and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "logging.report_to: 'wandb' needs the wandb package: pip install wandb"
            )
    except ConfigError as error:
        raise ConfigError(f"{config.recipe}: {error}") from None


def backend_names() -> list[str]:
    from swarmrl.rollout.backends import backend_names

    return backend_names()


class Registered:
    """A container of names, read from a registry the first time anyone looks."""

    def __init__(self, names: Callable[[], list[str]]) -> None:
        self._names = names

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())
