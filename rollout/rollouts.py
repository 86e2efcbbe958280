"""How a lease becomes the groups a worker submits: the rollout itself.

A single-turn rollout is one `generate` call for all of the lease's prompts, each sampled
`num_generations` times with the trainer's seed for it; every sample becomes a Completion
(token ids, per-token log-probs, text, why it stopped).
"""

from __future__ import annotations

from swarmrl.protocol import messages as m
from swarmrl.rollout.backend import InferenceBackend


def sample_groups(
    backend: InferenceBackend, lease: m.Lease, sampling: m.SamplingParams
) -> list[m.GroupResult]:
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
