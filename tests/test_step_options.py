"""The training options of a step beyond the loss formula: several iterations on one batch,
truncated completions masked out, and the scheduled learning rate in the demo payload."""

from __future__ import annotations

import pytest
import torch

from swarmrl.base.config import Config
from swarmrl.trainer.buffer import ScoredGroup
from swarmrl.trainer.step import pad_batch, step_normaliser, step_sequences


def group(truncated: list[bool]) -> ScoredGroup:
    return ScoredGroup(
        prompt_index=0,
        prompt_token_ids=[1, 2],
        completion_token_ids=[[5, 6, 7], [8]],
        behavior_logprobs=[[-1.0] * 3, [-1.0]],
        rewards=[1.0, 0.0],
        worker_id="w",
        policy_version=0,
        truncated=truncated,
    )


def test_truncated_completions_are_masked_out_only_when_asked() -> None:
    plain = Config(sampling={"num_generations": 2, "max_completion_length": 3})
    masking = Config(
        sampling={"num_generations": 2, "max_completion_length": 3},
        trainer={"mask_truncated_completions": True},
    )
    for config, rows in ((plain, [[1, 0, 0], [1, 1, 1]]), (masking, [[1, 0, 0], [0, 0, 0]])):
        sequences = step_sequences([group([True, False])], config, version=0)
        assert [s.truncated for s in sequences] == [False, True]  # shortest first
        assert pad_batch(sequences, 0, "cpu")["mask"].tolist() == rows
    # Masked sequences' tokens drop out of the step's count, as in TRL.
    masked = step_sequences([group([True, False])], masking, version=0)
    assert step_normaliser(masked).num_tokens == 1


@pytest.fixture(scope="module")
def model_and_tokenizer(model_path: str):
    from swarmrl.base.models import load_model, load_tokenizer

    return load_model(model_path), load_tokenizer(model_path)


def test_later_iterations_take_the_ratio_against_the_first_iterations_log_probs(
    model_and_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from swarmrl.trainer import step as step_module
    from tests.test_distributed import hand_built_batch, step_config

    model, tokenizer = model_and_tokenizer
    config = step_config(16)
    config.trainer.beta = 0.0
    config.trainer.learning_rate = 1e-3  # big enough to move the log-probs in one step
    batch = hand_built_batch(tokenizer, model)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = step_module.per_token_loss

    def spy(logprobs, old, *rest, **options):
        seen.append((logprobs.detach().clone(), old.clone()))
        return original(logprobs, old, *rest, **options)

    monkeypatch.setattr(step_module, "per_token_loss", spy)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    old: dict[int, list[float]] = {}
    for version in (0, 1):
        step_module.train_step(
            model, optimizer, batch, config, tokenizer.pad_token_id, version=version, old_store=old
        )
    (first_now, first_base), (second_now, second_base) = seen
    assert torch.equal(first_now, first_base)  # first iteration: ratio 1
    real = second_base != 0  # the kept rows stop at each completion's end (0 beyond)
    assert torch.equal(second_base[real], first_now[real])  # later: the first iteration's
    assert not torch.allclose(second_now, first_now)  # the policy moved in between


def test_the_scheduled_rate_is_the_one_the_demo_payload_carries(model_and_tokenizer) -> None:
    from swarmrl.protocol.codecs.decoupled_momentum import HEADER
    from swarmrl.trainer.optimizers import make_optimizer
    from swarmrl.trainer.step import train_step
    from tests.test_distributed import hand_built_batch, step_config

    model, tokenizer = model_and_tokenizer
    config = step_config(16)
    config.trainer.beta = 0.0
    config.trainer.optimizer = "demo"
    config.trainer.learning_rate, config.trainer.max_steps = 4e-5, 4
    config.trainer.lr_scheduler_type, config.trainer.warmup_steps = "linear", 2
    optimizer = make_optimizer(model, config.trainer)
    batch = hand_built_batch(tokenizer, model)
    rates = []
    for version in (1, 2):  # warmup's second step: lr 2e-5; then linear decay from 4e-5
        stats, _ = train_step(
            model, optimizer, batch, config, tokenizer.pad_token_id, version=version
        )
        header = HEADER.unpack_from(optimizer.last_payload)
        rates.append((stats["learning_rate"], header[5]))
    assert rates == [(2e-5, 2e-5), (4e-5, 4e-5)]
