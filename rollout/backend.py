"""The inference-backend interface every rollout engine implements (HF transformers now, vLLM next).

A backend owns one model copy and answers two questions: "sample `n` completions for each of
these token-id prompts, with per-token log-probs of the sampled tokens under the sampling
distribution" and "replace your weights with these tensors, in place". The worker loop knows
nothing else about the engine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch

    from swarmrl.protocol.messages import SamplingParams


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # processed: after temperature / top-k / top-p, renormalised
    finish_reason: Literal["stop", "length"]
    text: str  # token_ids decoded without special tokens


class InferenceBackend(Protocol):
    name: str

    def generate(
        self,
        prompts: list[list[int]],
        num_generations: int,
        sampling: SamplingParams,
        seeds: list[int],
    ) -> list[list[Sample]]:
        """`num_generations` samples per prompt, in prompt order."""
        ...

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace all weights in place; raise ValueError and change nothing if they don't fit."""
        ...


BACKENDS = ("auto", "vllm", "hf")


def make_backend(
    name: str, model: str, dtype: str, device: str, engine: Any = None
) -> InferenceBackend:
    """`auto` is vLLM when it is installed, else Hugging Face transformers."""
    if name == "auto":
        name = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if name == "vllm":
        from swarmrl.rollout.vllm_backend import VLLMBackend

        return VLLMBackend.from_reference(model, dtype=dtype, device=device, options=engine)
    if name == "hf":
        from swarmrl.rollout.hf_backend import HFBackend

        return HFBackend.from_reference(model, dtype=dtype, device=device)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
