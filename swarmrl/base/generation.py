"""Generation with a Hugging Face model: sampled completions with their log-probs, or greedy ones.

The one place that drives `model.generate`: the rollout's transformers backend samples with it,
the trainer's held-out evaluation decodes greedily with it. Prompts are token ids, left-padded
into one batch. A sampled token's log-prob comes from the processed scores (after temperature,
top-k and top-p, renormalised over the kept tokens), the distribution it was drawn from. A row
is cut after its first end token or stop string: what follows is padding. Nothing from the
model's own generation_config may reshape the distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # processed: after temperature / top-k / top-p, renormalised
    finish_reason: Literal["stop", "length"]
    text: str  # token_ids decoded without special tokens


class Generator:
    def __init__(self, model: Any, tokenizer: Any, synced_gpus: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.synced_gpus = synced_gpus  # sharded model: every rank runs every forward
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_ids = {e for e in eos_ids if e is not None}

    def sample(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        stop: list[str],
        temperature: float,
        top_p: float,
        top_k: int,
    ) -> list[Sample]:
        """One sampled completion per prompt (repeat a prompt for several), with log-probs."""
        output = self._generate(
            prompts,
            max_new_tokens=max_tokens,
            stop=stop,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,  # 0 is off; None would mean the model's default (often 50)
            output_scores=True,
        )
        new_tokens = output.sequences[:, max(len(p) for p in prompts) :]
        logprobs = self._sampled_logprobs(output.scores, new_tokens)
        return [self._trim(new_tokens[row], logprobs[row], stop) for row in range(len(prompts))]

    def greedy(self, prompts: list[list[int]], max_tokens: int, stop: list[str]) -> list[Sample]:
        """Greedy completions (up to and including the end token), without log-probs."""
        output = self._generate(prompts, max_new_tokens=max_tokens, stop=stop, do_sample=False)
        new_tokens = output.sequences[:, max(len(p) for p in prompts) :]
        return [self._trim(row, None, stop) for row in new_tokens]

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
