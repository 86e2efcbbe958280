"""How a lease becomes the groups a worker submits: the rollout itself.

A single-turn rollout is one `generate` call for all of the lease's prompts, each sampled
`num_generations` times with the trainer's seed for it; every sample becomes a Completion
(token ids, per-token log-probs, text, why it stopped). In a multi-turn run every sample is an
episode with the run's environment (environments/episode.py): the model's turns, the
environment's replies as the chat template renders them (log-prob 0), the turn lengths and
the reply messages, all of which the trainer checks by re-running the environment.
"""

from __future__ import annotations

from typing import Any

from swarmrl.base.generation import Sample
from swarmrl.environments import Environment
from swarmrl.environments.episode import Episode, run_episodes
from swarmrl.protocol import messages as m
from swarmrl.rollout.backend import InferenceBackend


def sample_groups(
    backend: InferenceBackend,
    lease: m.Lease,
    sampling: m.SamplingParams,
    environment: Environment | None = None,
) -> list[m.GroupResult]:
    if environment is not None:
        return sample_episodes(backend, lease, sampling, environment)
    samples = backend.generate(
        [p.token_ids for p in lease.prompts],
        lease.num_generations,
        sampling,
        [p.seed for p in lease.prompts],
    )
    return [
        m.GroupResult(
            prompt_id=prompt.prompt_id,
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
        for prompt, group in zip(lease.prompts, samples, strict=True)
    ]


def sample_episodes(
    backend: InferenceBackend,
    lease: m.Lease,
    sampling: m.SamplingParams,
    environment: Environment,
) -> list[m.GroupResult]:
    """`num_generations` episodes per prompt; each model turn of every episode still running
    is one batched `generate` call, seeded from the lease's seeds and the turn."""
    tokenizer, size = backend.tokenizer, lease.num_generations
    base_seed = lease.prompts[0].seed
    calls = 0

    def generate(prompts: list[list[int]], max_tokens: int) -> list[Sample]:
        nonlocal calls
        calls += 1
        seeds = [(base_seed + 7919 * calls + i) % 2**64 for i in range(len(prompts))]
        turn_sampling = sampling.model_copy(update={"max_tokens": max_tokens})
        return [group[0] for group in backend.generate(prompts, 1, turn_sampling, seeds)]

    episodes = run_episodes(
        environment,
        tokenizer,
        [p.token_ids for p in lease.prompts for _ in range(size)],
        generate,
        sampling.max_tokens,
        {tokenizer.eos_token_id},
    )
    return [
        m.GroupResult(
            prompt_id=prompt.prompt_id,
            completions=[
                episode_completion(e, tokenizer) for e in episodes[k * size : (k + 1) * size]
            ],
        )
        for k, prompt in enumerate(lease.prompts)
    ]


def episode_completion(episode: Episode, tokenizer: Any) -> m.Completion:
    return m.Completion(
        token_ids=episode.token_ids,
        logprobs=episode.logprobs,
        text=tokenizer.decode(episode.token_ids, skip_special_tokens=True),
        finish_reason=episode.finish_reason,
        turn_lengths=episode.turn_lengths,
        replies=[
            [m.ReplyMessage(role=message["role"], content=message["content"]) for message in reply]
            for reply in episode.replies
        ],
    )
