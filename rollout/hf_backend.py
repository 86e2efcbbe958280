"""Hugging Face transformers backend: batched sampling with per-token log-probs, CPU or CUDA.

One `generate` call per lease: all prompts of the lease, each repeated `num_generations` times,
left-padded into one batch. The log-prob of each sampled token is taken from the processed
scores (after temperature, top-k and top-p, renormalised over the kept tokens), the same
distribution the token was drawn from. HF generation draws from the global torch RNG, so the
lease's seeds seed that RNG once per call: a lease replays identically, single prompts do not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from swarmrl.rollout.backend import Sample

if TYPE_CHECKING:
    import torch

    from swarmrl.protocol.messages import SamplingParams


class HFBackend:
    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, synced_gpus: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.synced_gpus = synced_gpus  # sharded model: every rank runs every forward
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_ids = {e for e in eos_ids if e is not None}

    @classmethod
    def from_reference(cls, reference: str, dtype: str, device: str) -> HFBackend:
        from swarmrl.models import load_model, load_tokenizer

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
        output = self._generate(
            batch,
            max_new_tokens=sampling.max_tokens,
            stop=sampling.stop,
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0 is off; None would mean the model's default (often 50)
            output_scores=True,
        )
        new_tokens = output.sequences[:, max(len(p) for p in prompts) :]
        logprobs = self._sampled_logprobs(output.scores, new_tokens)
        samples = [
            self._trim(new_tokens[row], logprobs[row], sampling.stop) for row in range(len(batch))
        ]
        return [
            samples[i * num_generations : (i + 1) * num_generations] for i in range(len(prompts))
        ]

    def generate_greedy(
        self, prompts: list[list[int]], max_tokens: int, stop: list[str]
    ) -> list[list[int]]:
        """Greedy completions (token ids up to and including the end token), for evaluation."""
        output = self._generate(prompts, max_new_tokens=max_tokens, stop=stop, do_sample=False)
        new_tokens = output.sequences[:, max(len(p) for p in prompts) :]
        return [self._trim(row, None, stop).token_ids for row in new_tokens]

    def _generate(self, prompts: list[list[int]], stop: list[str], **options: Any) -> Any:
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        device = self.model.device
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device
        )
        with torch.inference_mode():
            return self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                pad_token_id=pad,
                eos_token_id=sorted(self.eos_ids),
                stop_strings=stop or None,
                tokenizer=self.tokenizer if stop else None,
                return_dict_in_generate=True,
                synced_gpus=self.synced_gpus,
                # Nothing from the model's own generation_config may reshape the distribution.
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                min_p=None,
                typical_p=1.0,
                **options,
            )

    @staticmethod
    def _sampled_logprobs(scores: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
        import torch

        # One step at a time: stacking all steps' scores would double the memory peak.
        values = torch.zeros(tokens.shape[0], len(scores))
        for step, step_scores in enumerate(scores):
            step_scores = step_scores.float()  # -inf where the sampler cut a token
            chosen = step_scores.gather(-1, tokens[:, step : step + 1]).squeeze(-1)
            values[:, step] = (chosen - torch.logsumexp(step_scores, dim=-1)).cpu()
        return values

    def _trim(self, tokens: torch.Tensor, logprobs: torch.Tensor | None, stop: list[str]) -> Sample:
        """Cut a row after its first end token or stop string: what follows is padding."""
        ids = tokens.tolist()
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        if stop:
            end = self._stop_string_end(ids[: len(ids) if end is None else end + 1], stop, end)
        length = len(ids) if end is None else end + 1
        values = [] if logprobs is None else logprobs[:length].tolist()
        return Sample(
            token_ids=ids[:length],
            logprobs=values,
            finish_reason="length" if end is None else "stop",
            text=self.tokenizer.decode(ids[:length], skip_special_tokens=True),
        )

    def _stop_string_end(self, ids: list[int], stop: list[str], end: int | None) -> int | None:
        """Index of the token that completes the first stop string, if one occurs."""
        for i in range(len(ids)):
            text = self.tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
            if any(s in text for s in stop):
                return i
        return end

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        load_parameters_in_place(self.model, tensors)


def load_parameters_in_place(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into the model's parameters, after checking every name and shape."""
    import torch

    parameters = dict(model.named_parameters())
    missing = sorted(set(parameters) - set(tensors))
    unexpected = sorted(set(tensors) - set(parameters))
    if missing or unexpected:
        raise ValueError(
            f"weights do not fit the model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for name, parameter in parameters.items():
        if tuple(tensors[name].shape) != tuple(parameter.shape):
            raise ValueError(
                f"weights do not fit the model: {name} has shape {tuple(tensors[name].shape)}, "
                f"expected {tuple(parameter.shape)}"
            )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(tensors[name])
