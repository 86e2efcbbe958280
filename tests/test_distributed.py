"""The sharded trainer (trainer/distributed.py, trainer/ranks.py) takes the same step as one
process, and `torchrun ... -m swarmrl train` runs a real swarm with it.

`torchrun` starts two gloo ranks on the CPU with the real tiny model; rank 0 reads a
hand-built batch and broadcasts it, both ranks take one sharded AdamW step, and rank 0 writes
the gathered weights and optimizer state. The test compares them with `train_step` in this
process on the same batch. This file is also the ranks' program (run under torchrun: `main`).
The end-to-end test runs the CLI under torchrun with a real worker, resumes it, and loads its
checkpoint in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from swarmrl.base.config import Config
from swarmrl.trainer.buffer import ScoredGroup
from swarmrl.trainer.distributed import split_micro_batches
from swarmrl.trainer.step import Sequence

PROMPTS = [
    "What is 12 + 7?",
    "Add 45 and 3, then explain the answer in one short sentence.",
    "Compute 99 + 1.",
]
COMPLETIONS = [
    ["19", "The answer is 19.", "20"],
    ["48, because 45 + 3 = 48.", "47", "It is forty-eight"],
    ["100", "99 + 1 = 100, so 100.", "101"],
]
REWARDS = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.5], [1.0, 1.0, 0.0]]


def step_config(micro_batch_size: int) -> Config:
    return Config(
        sampling={"num_generations": 3, "max_completion_length": 16},
        trainer={"micro_batch_size": micro_batch_size, "learning_rate": 1e-5, "beta": 0.04},
    )


def hand_built_batch(tokenizer, model) -> list[ScoredGroup]:
    """Three groups of three: real token ids and fixed rewards. The first two completions of
    each group report the model's own log-probs (they pass the strict log-prob check), the
    third made-up ones (masked out of the loss as a mismatch)."""
    groups = []
    for index, (prompt, completions, rewards) in enumerate(
        zip(PROMPTS, COMPLETIONS, REWARDS, strict=True)
    ):
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        ids = [tokenizer.encode(text, add_special_tokens=False) for text in completions]
        logprobs = [own_logprobs(model, prompt_ids, c, tokenizer.pad_token_id) for c in ids[:2]]
        logprobs.append([-0.3 - 0.1 * (k % 5) for k in range(len(ids[2]))])
        groups.append(
            ScoredGroup(
                prompt_index=index,
                prompt_token_ids=prompt_ids,
                completion_token_ids=ids,
                behavior_logprobs=logprobs,
                rewards=rewards,
                worker_id=f"w{index}",
                policy_version=0,
            )
        )
    return groups


def own_logprobs(model, prompt: list[int], completion: list[int], pad_id: int) -> list[float]:
    import torch

    from swarmrl.trainer.grpo import sequence_logprobs_from_logits
    from swarmrl.trainer.step import completion_logits, pad_batch

    batch = pad_batch([Sequence(prompt, completion, [0.0] * len(completion), 0.0)], pad_id, "cpu")
    with torch.no_grad():
        logits = completion_logits(model, batch)
        return sequence_logprobs_from_logits(logits, batch["completion_ids"], 1.0)[0].tolist()


def sequence(length: int) -> Sequence:
    return Sequence(
        prompt=[1], completion=[2] * length, behavior_logprobs=[-1.0] * length, advantage=0.0
    )


def test_split_gives_every_rank_the_same_number_of_micro_batches() -> None:
    sequences = [sequence(n) for n in range(1, 10)]  # 9 sequences, 2 ranks, micro-batches of 2
    shares = [split_micro_batches(sequences, 2, rank, 2) for rank in range(2)]
    assert [[len(chunk) for chunk in share] for share in shares] == [[1, 2, 2], [1, 1, 2]]
    taken = [s for share in shares for chunk in share for s in chunk]
    assert sorted(len(s.completion) for s in taken) == list(range(1, 10))


def test_split_leaves_a_rank_empty_micro_batches_when_it_runs_out() -> None:
    sequences = [sequence(n) for n in range(1, 4)]  # 3 sequences over 2 ranks, one at a time
    shares = [split_micro_batches(sequences, 1, rank, 2) for rank in range(2)]
    assert [[len(chunk) for chunk in share] for share in shares] == [[1, 1], [0, 1]]


def test_sharded_step_matches_one_process(model_path: str, tmp_path: Path) -> None:
    """Loss, grad norm, AdamW moments and weights after one step match `train_step`.

    The sharded run uses micro-batches of 1 (so rank 1, with 4 of the 9 sequences, runs an idle
    pass beside rank 0's fifth), the single-process run micro-batches of 4: the step must not
    depend on either. Both have a KL term against a reference model (sharded in the ranks, so
    the idle pass runs its collectives too). Three sequences report made-up log-probs: both runs
    must mask the same ones out of the loss (each rank finds those in its own share).

    Tolerances: both runs sum the same fp32 terms, but in another order and with other padding
    (other matmul shapes), which moves gradients by up to ~1e-4 of their largest element
    (measured: loss 4e-7 and grad norm 1e-5 relative, first moment = 0.1 x the clipped gradient
    within 1.7e-4 of each tensor's largest). So stats are compared at rtol 1e-4 and each moment
    tensor within 1e-3 of its largest element: a lost rank or an averaged instead of summed
    gradient is off by ~50%. AdamW's first update is lr * g / (|g| + eps), about lr * sign(g):
    an element whose gradient is within rounding of zero may move either way (measured: 6 of
    134.5M elements by more than lr). So weights are compared where the two gradients agree to
    10% (99.98% of the elements; at least 90% required): there the updates differ by at most
    ~0.03 * lr (measured 0.03 * lr; allowed 0.05 * lr).
    """
    import torch
    from safetensors.torch import load_file

    from swarmrl.base.models import load_model, load_tokenizer
    from swarmrl.trainer.step import train_step

    torch.set_num_threads(1)  # the ranks get the other core
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    batch = hand_built_batch(tokenizer, model)
    (tmp_path / "batch.json").write_text(json.dumps([asdict(group) for group in batch]))
    out = tmp_path / "sharded"
    launch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            __file__,
            model_path,
            str(tmp_path / "batch.json"),
            str(out),
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    reference = load_model(model_path).requires_grad_(False)
    config = step_config(micro_batch_size=4)
    stats, mismatches = train_step(
        model, optimizer, batch, config, tokenizer.pad_token_id, reference, version=0
    )
    output, _ = launch.communicate(timeout=300)
    assert launch.returncode == 0, output[-4000:]

    sharded = torch.load(out / "stats.pt")
    for name in ("loss", "grad_norm", "entropy", "is_weight_mean", "completion_tokens"):
        assert abs(sharded[name] - stats[name]) <= 1e-4 * abs(stats[name]) + 1e-9, name
    assert sharded["sequences"] == 9.0
    assert sharded["logprob_rejected"] == stats["logprob_rejected"] == 3.0
    assert sorted(map(tuple, sharded["mismatched"])) == sorted(
        (m.worker_id, m.prompt_index) for m in mismatches
    )

    moments = load_file(str(out / "exp_avg.safetensors"))
    weights = load_file(str(out / "weights.safetensors"))
    lr, determined, total = 1e-5, 0, 0
    for name, parameter in model.named_parameters():
        exp_avg = optimizer.state[parameter]["exp_avg"]
        scale = float(exp_avg.abs().max())
        torch.testing.assert_close(moments[name], exp_avg, rtol=0, atol=1e-3 * scale)
        # Where the two gradients agree to 10%, the update's direction is settled.
        settled = exp_avg.abs() > 10 * (moments[name] - exp_avg).abs()
        moved = weights[name] - before[name]
        expected = parameter.detach() - before[name]
        assert (moved - expected)[settled].abs().max() <= 0.05 * lr, name
        determined += int(settled.sum())
        total += settled.numel()
    assert determined > 0.9 * total, f"only {determined} of {total} updates comparable"
    assert sharded["reloaded_matches"] is True


def test_screening_finds_the_made_up_logprobs(model_path: str) -> None:
    """The log-prob check without a step (for groups from workers not yet proven honest):
    exactly the third completion of each hand-built group, whose log-probs are made up."""
    from swarmrl.base.models import load_model, load_tokenizer
    from swarmrl.trainer.step import screen_groups

    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    groups = hand_built_batch(tokenizer, model)
    failed = screen_groups(model, groups, step_config(4), tokenizer.pad_token_id, version=0)
    found = sorted((f.worker_id, f.prompt_index) for f in failed)
    assert found == [("w0", 0), ("w1", 1), ("w2", 2)]
    assert all(f.mean_gap > 0.1 for f in failed)


@pytest.mark.e2e
def test_torchrun_serves_a_worker_checkpoints_and_resumes(model_path: str, tmp_path: Path) -> None:
    """Two gloo ranks run `swarmrl train` for one step with a real worker, then `--resume` for
    a second; the worker replays both versions (full keyframes, fingerprint-checked), and the
    gathered checkpoint loads in a single process with AdamW's state matched by name."""
    import torch

    from swarmrl.base.models import load_model
    from swarmrl.trainer.checkpoint import load_latest
    from tests.conftest import (  # not in the ranks
        E2E_RECIPE,
        FAST_RUN,
        free_port,
        start_worker,
        swarmrl,
        wait_for_text,
    )

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    folder = tmp_path / "sharded"

    def torchrun(name: str, *arguments: str) -> None:
        command = [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "swarmrl",
            "train",
            *arguments,
            "--bind",
            endpoint,
        ]
        job = swarmrl(*command, log=tmp_path / f"{name}.log", module=False)
        assert job.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-4000:]

    worker = start_worker(tmp_path, endpoint, "w1")
    try:
        torchrun(
            "first",
            E2E_RECIPE,
            *FAST_RUN,
            "--trainer.optimizer",
            "adamw",
            "--trainer.max_steps",
            "1",
            "--checkpoint.every_steps",
            "1",
            "--logging.run_dir",
            str(tmp_path),
            "--logging.run_name",
            "sharded",
        )
        torchrun("resumed", "--resume", str(folder), "--trainer.max_steps", "2")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    log = (folder / "trainer.log").read_text()
    assert "on rank 0 of 2, cpu" in log and "(step 1)" in log and "step 2 reward" in log, log
    # The trainer hands the final weights over before it stops; the worker logs them.
    wait_for_text(tmp_path / "w1.log", "weights now at version 2 (full", 60)

    model = load_model(model_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    state = load_latest(folder / "checkpoints", model, optimizer)
    assert state is not None and state["step"] == 2
    moments = [optimizer.state[p] for p in model.parameters()]
    assert all(float(m["step"]) == 2.0 and m["exp_avg"].abs().sum() > 0 for m in moments)


def main(model_path: str, batch_path: Path, out: Path) -> None:
    """One rank of the sharded run: broadcast, step, gather, write (rank 0), reload check."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from swarmrl.base.models import load_model, load_tokenizer
    from swarmrl.trainer import distributed as d

    rank = d.init_distributed(timeout_s=120)
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(model_path)
    model = d.shard_model(load_model(model_path))
    reference = d.shard_model(load_model(model_path).requires_grad_(False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    mine = None
    if rank.is_main:
        mine = [ScoredGroup(**group) for group in json.loads(batch_path.read_text())]
    batch, stop = d.broadcast_batch(mine, rank)
    assert batch is not None and not stop
    stats, mismatches = d.train_step_sharded(
        model,
        optimizer,
        batch,
        step_config(1),
        tokenizer.pad_token_id,
        rank,
        reference,
        version=0,
    )
    parameters = d.full_parameters(model)
    state = d.full_optimizer_state(model, optimizer)
    # A fresh sharded model and optimizer loaded from rank 0's gathered state must hold the
    # same shards on every rank.
    copy = d.shard_model(load_model(model_path))
    copy_optimizer = torch.optim.AdamW(copy.parameters(), lr=1e-5)
    d.load_full_state(copy, copy_optimizer, parameters, state)
    same: list[bool | None] = [None] * rank.world_size
    dist.all_gather_object(same, same_shards(model, optimizer, copy, copy_optimizer))
    _, stop = d.broadcast_batch(None, rank, stop=True)
    assert stop
    if rank.is_main:
        out.mkdir(parents=True)
        stats["reloaded_matches"] = all(same)
        stats["mismatched"] = [(m.worker_id, m.prompt_index) for m in mismatches]
        torch.save(stats, out / "stats.pt")
        save_file(parameters, str(out / "weights.safetensors"))
        moments = {name: value["exp_avg"] for name, value in state["state"].items()}
        save_file(moments, str(out / "exp_avg.safetensors"))
    d.shutdown()


def same_shards(model, optimizer, copy, copy_optimizer) -> bool:
    """This rank's parameter and AdamW state shards are equal in both models."""
    import torch

    def local(tensor):
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    for p, q in zip(model.parameters(), copy.parameters(), strict=True):
        pairs = [(p, q)] + [
            (optimizer.state[p][key], copy_optimizer.state[q][key])
            for key in ("step", "exp_avg", "exp_avg_sq")
        ]
        if not all(torch.equal(local(a), local(b)) for a, b in pairs):
            return False
    return True


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
