"""The inference backends a worker can run, by name, and `--backend auto`.

Adding an engine is one file implementing backend.InferenceBackend plus one line in BACKENDS.
`auto` takes the first backend in this order that the machine can run.
"""

from __future__ import annotations

from swarmrl.rollout.backend import EngineOptions, InferenceBackend
from swarmrl.rollout.hf_backend import HFBackend
from swarmrl.rollout.vllm_backend import VLLMBackend

BACKENDS: dict[str, type[InferenceBackend]] = {
    backend.name: backend for backend in (VLLMBackend, HFBackend)
}
AUTO = "auto"


def backend_names() -> list[str]:
    """Every name `--backend` takes, `auto` first."""
    return [AUTO, *BACKENDS]


def backend_class(name: str) -> type[InferenceBackend]:
    """The backend `name` stands for; ValueError for an unknown name."""
    if name == AUTO:
        return next(backend for backend in BACKENDS.values() if backend.available())
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())}")
    return BACKENDS[name]


def make_backend(
    name: str, model: str, dtype: str, device: str, options: EngineOptions | None = None
) -> InferenceBackend:
    return backend_class(name).from_reference(model, dtype, device, options or EngineOptions())
