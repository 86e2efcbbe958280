"""The learning-rate schedule against transformers' own schedulers, and by hand."""

from __future__ import annotations

import math

import pytest
import torch

from swarmrl.base.config import TrainerConfig
from swarmrl.trainer.schedule import learning_rate, lr_multiplier, set_learning_rate


def test_by_hand() -> None:
    assert [lr_multiplier("linear", s, 10, 2) for s in (0, 1, 2, 6, 10)] == [0, 0.5, 1, 0.5, 0]
    assert lr_multiplier("cosine", 6, 10, 2) == pytest.approx(0.5)  # half way through decay
    assert lr_multiplier("cosine", 2, 10, 2) == 1.0 and lr_multiplier("cosine", 10, 10, 2) == 0
    assert lr_multiplier("constant", 0, 10, 5) == 1.0  # transformers ignores warmup here


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_the_same_rates_as_transformers(kind: str) -> None:
    from transformers import get_scheduler

    trainer = TrainerConfig(
        learning_rate=3e-5, lr_scheduler_type=kind, warmup_ratio=0.25, max_steps=12
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-5)
    reference = get_scheduler(kind, optimizer, num_warmup_steps=3, num_training_steps=12)
    for step in range(12):
        assert learning_rate(trainer, step) == pytest.approx(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()


def test_a_resumed_run_continues_the_schedule_exactly() -> None:
    trainer = TrainerConfig(
        learning_rate=1e-4, lr_scheduler_type="linear", warmup_steps=2, max_steps=8
    )
    straight = [learning_rate(trainer, step) for step in range(8)]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    resumed = [set_learning_rate(optimizer, trainer, step) for step in range(5, 8)]  # from 5
    assert resumed == straight[5:] and optimizer.param_groups[0]["lr"] == straight[7]
    assert math.isclose(straight[1], 0.5e-4)


def test_warmup_steps_or_ratio_not_both() -> None:
    with pytest.raises(ValueError, match="warmup_steps or warmup_ratio"):
        TrainerConfig(warmup_steps=2, warmup_ratio=0.1)
