"""Hugging Face transformers backend: batched sampling with per-token log-probs, CPU or CUDA.

One `generate` call per lease: all prompts of the lease, each repeated `num_generations` times,
in one batch (base/generation.py does the decoding and the log-probs). HF generation draws
from the global torch RNG, so the lease's seeds seed that RNG once per call: a lease replays
identically, single prompts do not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from swarmrl.base.generation import Generator
from swarmrl.base.models import load_model, load_parameters_in_place, load_tokenizer
from swarmrl.rollout.backend import EngineOptions, InferenceBackend, Sample

if TYPE_CHECKING:
    import torch

    from swarmrl.protocol.messages import SamplingParams


class HFBackend(InferenceBackend):
    name = "hf"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generator = Generator(model, tokenizer)

    @classmethod
    def from_reference(
        cls, reference: str, dtype: str, device: str, options: EngineOptions | None = None
    ) -> HFBackend:
        return cls(load_model(reference, dtype=dtype, device=device), load_tokenizer(reference))

    def generate(
        self,
        prompts: list[list[int]],
        num_generations: int,
        sampling: SamplingParams,
        seeds: list[int],
    ) -> list[list[Sample]]:
        import torch

        torch.manual_seed(hash(tuple(seeds)) % (2**63))
        batch = [ids for ids in prompts for _ in range(num_generations)]
        samples = self.generator.sample(
            batch,
            max_tokens=sampling.max_tokens,
            stop=sampling.stop,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
        )
        n = num_generations
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        load_parameters_in_place(self.model, tensors)
