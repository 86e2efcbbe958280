"""The training options from TRL and verl, each family in one short real run of the CLI with a
real worker: newer losses with their corrections and schedules, LoRA, TRL's dataset format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import start_trainer, start_worker, swarmrl, wait_for_text

pytestmark = pytest.mark.e2e


def train_records(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for line in lines if (r := json.loads(line))["kind"] == "train"]


def run_with_a_worker(
    tmp_path: Path, name: str, steps: int, *options: str, recipe: str | None = None
) -> Path:
    trainer, endpoint = start_trainer(tmp_path, name, steps, *options, recipe=recipe)
    worker = start_worker(tmp_path, endpoint, "w")
    try:
        assert trainer.wait(timeout=900) == 0, (tmp_path / f"{name}-console.log").read_text()[
            -3000:
        ]
    finally:
        for process in (worker, trainer):
            if process.poll() is None:
                process.kill()
    return tmp_path / name


def trl_conversational_recipe(tmp_path: Path) -> str:
    """A recipe as a TRL user brings it: a JSONL dataset in TRL's conversational format (a
    `prompt` column of chat messages, a system message among them, an extra `solution` column
    the reward reads) with TRL-style reward functions; nothing flattened beforehand."""
    conversation = [
        {"role": "system", "content": "Answer with the number only."},
        {"role": "user", "content": "What is {a} + {b}?"},
    ]
    rows = []
    for a in range(10, 40):
        prompt = [dict(m, content=m["content"].format(a=a, b=3)) for m in conversation]
        rows.append({"prompt": prompt, "solution": str(a + 3)})
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "trl.toml"
    recipe.write_text(
        '[data]\nsource = "huggingface"\npath = "json"\n'
        'data_files = { train = "train.jsonl", test = "test.jsonl" }\n\n'
        '[trainer]\noptimizer = "demo"\nlearning_rate = 5e-5\n\n'
        '[[rewards]]\nfunction = "tests.trl_rewards:solution_match"\n'
        '[[rewards]]\nfunction = "tests.trl_rewards:reward_len"\nweight = 0.1\n'
    )
    return str(recipe)


def test_cispo_gspo_masked_sampling_overlong_cosine_and_two_iterations_on_a_trl_dataset(
    model_path: str, tmp_path: Path
) -> None:
    """One run for the loss family and TRL's dataset format (each run costs a model load)."""
    folder = run_with_a_worker(
        tmp_path,
        "losses",
        4,
        "--trainer.loss_type",
        "cispo",
        "--trainer.epsilon_high",
        "5.0",
        "--trainer.importance_sampling_level",
        "sequence",
        "--trainer.vllm_importance_sampling_mode",
        "sequence_mask",
        "--trainer.vllm_importance_sampling_clip_max",
        "3.0",
        "--trainer.mask_truncated_completions",
        "true",
        "--trainer.overlong_buffer_len",
        "4",
        "--trainer.lr_scheduler_type",
        "cosine",
        "--trainer.warmup_steps",
        "1",
        "--trainer.num_iterations",
        "2",
        recipe=trl_conversational_recipe(tmp_path),
    )
    steps = train_records(folder)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # two batches, two versions each
    base = 5e-5  # the recipe's learning rate
    expected = [0.0] + [base * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in (0, 1, 2)]
    assert [s["learning_rate"] for s in steps] == pytest.approx(expected)
    assert all(0.0 <= s["truncated_fraction"] <= 1.0 for s in steps)
    ledger = json.loads((folder / "workers.json").read_text())["workers"]
    assert ledger["w"]["samples"] > 0 and ledger["w"]["rejected"] == 0
    wait_for_text(tmp_path / "w.log", "weights now at version 4 (demo", 60)


def test_lora_trains_adapters_workers_merge_them_and_the_checkpoint_is_a_peft_folder(
    model_path: str, tmp_path: Path
) -> None:
    from peft import PeftModel

    from swarmrl.base.models import load_model

    folder = run_with_a_worker(
        tmp_path, "lora", 2, "--model.use_peft", "true", "--checkpoint.every_steps", "1"
    )
    steps = train_records(folder)
    assert [s["step"] for s in steps] == [1, 2]
    # The worker replayed the adapters' updates and generated with the merged weights: its
    # log-probs passed the trainer's strict check (float32 both sides).
    ledger = json.loads((folder / "workers.json").read_text())["workers"]
    assert ledger["w"]["samples"] > 0 and ledger["w"]["rejected"] == 0
    worker_log = (tmp_path / "w.log").read_text()
    assert "weights now at version 0 (full" in worker_log  # the adapters, as a keyframe
    wait_for_text(tmp_path / "w.log", "weights now at version 2 (demo", 60)
    assert all(s["update_bytes"] < 20_000 for s in steps)  # adapters' DCT step: kilobytes
    checkpoint = folder / "checkpoints" / "step_2"
    assert (checkpoint / "adapter_config.json").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # adapters only
    tuned = PeftModel.from_pretrained(load_model(model_path), str(checkpoint))
    trained = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)  # B starts at zero
    # `swarmrl export` merges the adapters: a plain model folder that computes the same.
    merged = tmp_path / "merged"
    exported = swarmrl("export", str(checkpoint), "--out", str(merged), log=tmp_path / "x.log")
    assert exported.wait(timeout=300) == 0, (tmp_path / "x.log").read_text()[-2000:]
    assert (merged / "model.safetensors").is_file() and not (
        merged / "adapter_config.json"
    ).exists()
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = tuned(input_ids=tokens).logits.log_softmax(-1)
        got = load_model(str(merged))(input_ids=tokens).logits.log_softmax(-1)
    assert (expected - got).abs().max() < 1e-3  # float32 rounding: the strict log-prob band
