"""The top layer: the `swarmrl` command and the local launcher. Imports every other layer."""

from swarmrl.cli.main import main

__all__ = ["main"]
