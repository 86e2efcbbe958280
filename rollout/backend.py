"""The inference-backend interface every rollout engine implements, and its engine options.

A backend owns one model copy (and its `tokenizer`, which multi-turn episodes render the
environment's replies with) and answers two questions: "sample `n` completions for each of
these token-id prompts, with per-token log-probs of the sampled tokens under the sampling
distribution" and "replace your weights with these tensors, in place". The worker loop knows
nothing else about the engine. Backends are registered in backends.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from swarmrl.base.generation import Sample

if TYPE_CHECKING:
    import torch

    from swarmrl.protocol.messages import SamplingParams

__all__ = ["EngineOptions", "InferenceBackend", "Sample"]


@dataclass
class EngineOptions:
    """What a worker's operator may tune about its engine (`swarmrl worker --help`)."""

    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256
    max_model_len: int | None = None


class InferenceBackend(ABC):
    name: ClassVar[str]
    tokenizer: Any  # the model's Hugging Face tokenizer

    @classmethod
    def available(cls) -> bool:
        """Whether this machine has what the backend needs (for `--backend auto`)."""
        return True

    @classmethod
    @abstractmethod
    def from_reference(
        cls, reference: str, dtype: str, device: str, options: EngineOptions
    ) -> InferenceBackend:
        """Load the model a run spec names (a Hub id, a folder or a `pkg:` reference)."""

    @abstractmethod
    def generate(
        self,
        prompts: list[list[int]],
        num_generations: int,
        sampling: SamplingParams,
        seeds: list[int],
    ) -> list[list[Sample]]:
        """`num_generations` samples per prompt, in prompt order."""

    @abstractmethod
    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace all weights in place; raise ValueError and change nothing if they don't fit."""
