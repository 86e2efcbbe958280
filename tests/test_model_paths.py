"""The real tiny model through the HF backend, the training step and the weight payload."""

from __future__ import annotations

import pytest

from swarmrl.base.config import Config
from swarmrl.protocol.codecs.full import decode_full, encode_full
from swarmrl.protocol.codecs.interface import PayloadError, weights_fingerprint
from swarmrl.protocol.messages import SamplingParams
from swarmrl.trainer.buffer import ScoredGroup
from swarmrl.trainer.step import completion_logits, flatten, pad_batch

pytestmark = pytest.mark.e2e

SAMPLING = SamplingParams(
    temperature=1.0, top_p=1.0, top_k=0, max_tokens=12, stop=[], logprobs_mode="processed"
)


@pytest.fixture(scope="module")
def backend(model_path: str):
    import torch

    from swarmrl.rollout.hf_backend import HFBackend

    torch.set_num_threads(2)
    return HFBackend.from_reference(model_path, dtype="float32", device="cpu")


def prompts(backend) -> list[list[int]]:
    texts = ["What is 12 + 7? Answer with just the number.", "Name a colour."]
    return [
        backend.tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
        )
        for t in texts
    ]


def token_prompts(backend) -> list[list[int]]:
    return [backend.tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts(backend)]


def greedy(backend, batch_prompts: list[list[int]]) -> list[list[int]]:
    return [sample.token_ids for sample in backend.generator.greedy(batch_prompts, 12, [])]


def test_worker_logprobs_match_the_trainers_recompute(backend) -> None:
    """Left-padded sampling and the trainer's packed forward agree token by token (fp32)."""
    import torch

    from swarmrl.trainer.grpo import sequence_logprobs_from_logits

    batch_prompts = token_prompts(backend)
    samples = backend.generate(batch_prompts, 3, SAMPLING, seeds=[1, 2])
    assert [len(group) for group in samples] == [3, 3]
    groups = [
        ScoredGroup(
            prompt_index=i,
            prompt_token_ids=p,
            completion_token_ids=[s.token_ids for s in group],
            behavior_logprobs=[s.logprobs for s in group],
            rewards=[0.0, 1.0, 0.0],
            worker_id="w",
            policy_version=0,
        )
        for i, (p, group) in enumerate(zip(batch_prompts, samples, strict=True))
    ]
    config = Config.model_validate({"sampling": {"num_generations": 3}})
    batch = pad_batch(flatten(groups, config, version=0), backend.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logits = completion_logits(backend.model, batch)
        trainer_logprobs = sequence_logprobs_from_logits(logits, batch["completion_ids"], 1.0)
    gap = (trainer_logprobs - batch["behavior_logprobs"]).abs() * batch["mask"]
    assert batch["mask"].sum() > 10
    assert gap.max().item() < 1e-3
    for group in samples:
        for sample in group:
            assert sample.text == backend.tokenizer.decode(
                sample.token_ids, skip_special_tokens=True
            )
            assert len(sample.logprobs) == len(sample.token_ids)
            assert all(value <= 0 for value in sample.logprobs)


def test_weight_update_changes_outputs_and_restoring_brings_them_back(backend) -> None:
    import torch

    batch_prompts = token_prompts(backend)
    before = greedy(backend, batch_prompts)
    weights = dict(backend.model.named_parameters())
    original, original_fingerprint = encode_full(weights), weights_fingerprint(weights)
    tensors = decode_full(original, original_fingerprint)
    perturbed = {name: tensor + 0.02 * torch.randn_like(tensor) for name, tensor in tensors.items()}
    backend.load_weights(perturbed)
    assert greedy(backend, batch_prompts) != before
    backend.load_weights(decode_full(original, original_fingerprint))
    assert greedy(backend, batch_prompts) == before


def test_bad_payloads_leave_the_weights_untouched(backend) -> None:
    weights = dict(backend.model.named_parameters())
    payload, expected = encode_full(weights), weights_fingerprint(weights)
    with pytest.raises(PayloadError, match="safetensors"):
        decode_full(payload[: len(payload) // 2], expected)
    with pytest.raises(PayloadError, match="fingerprint"):
        decode_full(payload, "0" * 64)
    tensors = decode_full(payload, expected)
    name = next(iter(tensors))
    wrong_shape = dict(tensors, **{name: tensors[name][:1]})
    with pytest.raises(ValueError, match="shape"):
        backend.load_weights(wrong_shape)
    missing = {k: v for k, v in tensors.items() if k != name}
    with pytest.raises(ValueError, match="missing"):
        backend.load_weights(missing)
    assert weights_fingerprint(dict(backend.model.named_parameters())) == expected


def test_stop_strings_end_the_completion_where_they_occur(backend) -> None:
    sampling = SAMPLING.model_copy(update={"stop": [" "], "max_tokens": 16})
    samples = backend.generate(token_prompts(backend)[:1], 4, sampling, seeds=[3])[0]
    for sample in samples:
        assert len(sample.logprobs) == len(sample.token_ids) >= 1
        before_last = backend.tokenizer.decode(sample.token_ids[:-1], skip_special_tokens=True)
        assert " " not in before_last  # nothing is kept after the stop string
        if sample.finish_reason == "stop":
            assert " " in sample.text or sample.token_ids[-1] in backend.generator.eos_ids
