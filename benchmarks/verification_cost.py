"""What verifying untrusted workers costs the trainer, as a share of its step time.

The default recipe's settings (SmolLM2-135M, 8 samples per prompt, up to 32 tokens, 2 prompts
per lease, 4 prompts per step), with honest samples from the transformers backend:

- network side, per submission: `Intake.admit` (lease checks, token ids decoded and compared,
  replay hashes, scoring with the reward functions) plus the size gate;
- training side, per step: the log-prob check inside the loss forward pass
  (`step.mask_logprob_mismatches`, timed by wrapping it) against the whole `train_step`.

    python benchmarks/verification_cost.py [--steps 3] [--threads 2]

Prints the numbers and writes benchmarks/results/verification_cost.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from swarmrl.base.models import load_model, load_tokenizer
from swarmrl.base.recipes import load_config
from swarmrl.protocol import messages as m
from swarmrl.protocol.framing import encode
from swarmrl.rewards import load_reward_function
from swarmrl.rollout.hf_backend import HFBackend
from swarmrl.trainer import step as step_module
from swarmrl.trainer.data import load_tasks
from swarmrl.trainer.intake import Intake
from swarmrl.trainer.leases import LeaseBook, prompt_id
from swarmrl.trainer.limits import Gate
from swarmrl.trainer.optimizers import make_optimizer

RESULTS = Path(__file__).resolve().parent / "results" / "verification_cost.json"


def timed_check() -> list[float]:
    """Wrap the step's log-prob check so every call's duration is recorded."""
    durations: list[float] = []
    check = step_module.mask_logprob_mismatches

    def wrapper(*arguments):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        result = check(*arguments)
        durations.append(time.perf_counter() - started)
        return result

    step_module.mask_logprob_mismatches = wrapper
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    config = load_config("arithmetic")
    tokenizer = load_tokenizer(config.model.name)
    model = load_model(config.model.name, dtype=config.model.dtype)
    worker = HFBackend(load_model(config.model.name, dtype=config.model.dtype), tokenizer)
    tasks = load_tasks(config.data, 0)
    rewards = [(r.function, load_reward_function(r.function), r.weight) for r in config.rewards]
    intake, leases = Intake(config, tokenizer, tasks, rewards), LeaseBook(0, 300.0)
    gate = Gate(config, tokenizer)
    optimizer = make_optimizer(model, config.trainer)
    check_durations = timed_check()
    admit, step_times, check_per_step, submissions = [], [], [], 0
    for version in range(options.steps):
        groups = []
        while len(groups) < config.trainer.prompts_per_step:
            lease = leases.issue("w", config.swarm.prompts_per_lease, version, 0.0)
            prompts = [intake.prompt(i)[1] for i in lease.prompt_indices]
            samples = worker.generate(
                prompts,
                config.sampling.num_generations,
                m.SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=32),
                lease.seeds,
            )
            sub = m.Submission(
                lease_id=lease.lease_id,
                policy_version=version,
                generation_seconds=1.0,
                groups=[
                    m.GroupResult(
                        prompt_id=prompt_id(i),
                        completions=[
                            m.Completion(
                                token_ids=s.token_ids,
                                logprobs=s.logprobs,
                                text=s.text,
                                finish_reason=s.finish_reason,
                            )
                            for s in group
                        ],
                    )
                    for i, group in zip(lease.prompt_indices, samples, strict=True)
                ],
            )
            frames = encode(sub)
            started = time.perf_counter()
            gate.refusal(b"w", len(frames[0]), may_submit=True, now=0.0)
            leases.close(lease.lease_id, "w", 0.0)
            scored = intake.admit(sub, lease, version, "w")
            admit.append(time.perf_counter() - started)
            submissions += 1
            groups += [g for g in scored if g.has_signal()]
        del check_durations[:]
        started = time.perf_counter()
        _, mismatches = step_module.train_step(
            model,
            optimizer,
            groups[: config.trainer.prompts_per_step],
            config,
            tokenizer.pad_token_id,
            version=version,
        )
        step_times.append(time.perf_counter() - started)
        check_per_step.append(sum(check_durations))
        worker.load_weights({n: p.detach().clone() for n, p in model.named_parameters()})
        assert not mismatches, f"honest samples failed the check: {mismatches}"
    per_step_admit = sum(admit) / options.steps  # every submission the steps needed
    step = statistics.median(step_times)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {options.threads} threads",
        "optimizer": f"{config.trainer.optimizer}, lr {config.trainer.learning_rate:g}",
        "submissions": submissions,
        "admit_ms_per_submission": 1000 * statistics.median(admit),
        "admit_ms_per_step": 1000 * per_step_admit,
        "logprob_check_ms_per_step": 1000 * statistics.median(check_per_step),
        "train_step_s": step,
        "share_of_step": (per_step_admit + statistics.median(check_per_step)) / step,
    }
    print(json.dumps(result, indent=1))
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
