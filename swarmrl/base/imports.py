"""Loading what a recipe names, by registered name or import path (`package.module:name`),
with errors that say which part is wrong: reward functions, environments and tools all go
through `resolve`."""

from __future__ import annotations

import importlib
from typing import Any


def resolve(spec: str, registry: dict[str, Any], what: str, example: str, kind: str) -> Any:
    """`registry[spec]`, or the object at the import path `spec`; ValueError naming `what`,
    what is registered and an `example` path, or what is wrong with the path."""
    if ":" in spec:
        return import_object(spec, what, kind)
    if spec not in registry:
        raise ValueError(
            f"unknown {what} {spec!r}; registered: {', '.join(sorted(registry))} "
            f"(or give an import path like {example!r})"
        )
    return registry[spec]


def import_object(path: str, what: str, kind: str) -> Any:
    """The object at `package.module:<kind>`, or ValueError naming `what` and the problem (for
    a package this machine lacks: which one to install)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"bad {what} path {path!r}; expected 'package.module:{kind}'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        missing = (
            f"; this machine needs the package {e.name!r} installed"
            if isinstance(e, ModuleNotFoundError)
            else ""
        )
        raise ValueError(
            f"{what} {path!r}: cannot import module {module_name!r}: {type(e).__name__}: {e}"
            f"{missing}"
        ) from e
    if not hasattr(module, attribute):
        raise ValueError(f"{what} {path!r}: module {module_name!r} has no {attribute!r}")
    return getattr(module, attribute)
