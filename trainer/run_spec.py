"""What a worker is told when it says hello: the run it joins (`run_spec`).

The model, its dtype, how to sample (with processed log-probs), the group size, the
environment of a multi-turn run and the heartbeat clock all come from the trainer's config;
the worker brings only its hardware.
"""

from __future__ import annotations

from swarmrl.base.adapters import adapter_scale
from swarmrl.base.config import Config
from swarmrl.protocol import messages as m


def run_spec(config: Config, run_id: str, worker_id: str, version: int) -> m.RunSpec:
    """What a worker is told to run: the model, how to sample, the group size, the clock."""
    sampling, swarm, environment = config.sampling, config.swarm, config.environment
    return m.RunSpec(
        run_id=run_id,
        worker_id=worker_id,
        model=config.model.name,
        dtype=config.model.dtype,
        sampling=m.SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_completion_length,
            stop=sampling.stop,
        ),
        num_generations=sampling.num_generations,
        heartbeat_interval_s=swarm.heartbeat_interval_s,
        heartbeat_timeout_s=swarm.heartbeat_timeout_s,
        weights_version=version,
        adapter_scale=adapter_scale(config.model),
        environment=None
        if environment is None
        else m.EnvironmentSpec.model_validate(environment.model_dump()),
    )
