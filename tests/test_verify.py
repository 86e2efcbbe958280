"""Tests for swarmrl.trainer.verify: every reject reason, the texts of a good submission, replays,
and the log-prob check (bands on hand-built numbers; on the real tiny model through train_step)."""

from typing import Any

import pytest

from swarmrl.base.config import Config, SamplingConfig, TrainerConfig
from swarmrl.protocol.messages import Completion, GroupResult, Submission
from swarmrl.protocol.refusals import Refused
from swarmrl.trainer.buffer import ScoredGroup
from swarmrl.trainer.checks import ReplayGuard, check_submission
from swarmrl.trainer.data import prompt_text, prompt_token_ids
from swarmrl.trainer.leases import OpenLease
from swarmrl.trainer.logprob_check import LogprobBand, LogprobMismatch, logprob_verdict
from swarmrl.trainer.step import train_step

# ids 0..9: 0 is a special token (dropped by skip_special_tokens), 1..9 are the letters a..i
LETTERS = "abcdefghi"


class FakeTokenizer:
    def __len__(self) -> int:
        return 10

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(
            ("" if skip_special_tokens else "</s>") if i == 0 else LETTERS[i - 1] for i in ids
        )


CONFIG = Config(
    sampling=SamplingConfig(num_generations=2, max_completion_length=4),
    trainer=TrainerConfig(max_staleness=1),
)
LEASE = OpenLease(
    lease_id="L7",
    worker_id="w1",
    prompt_indices=[3, 8],
    seeds=[11, 12],
    policy_version=4,
    deadline=100.0,
)


def completion(ids: list[int], text: str | None = None) -> Completion:
    if text is None:
        text = "".join(LETTERS[i - 1] for i in ids if i)
    return Completion(token_ids=ids, logprobs=[-0.5] * len(ids), text=text, finish_reason="stop")


def submission(
    groups: list[tuple[str, list[Completion]]] | None = None, version: int = 4
) -> Submission:
    if groups is None:
        groups = [
            ("p3", [completion([1, 2]), completion([3, 0])]),
            ("p8", [completion([9, 9, 9, 9]), completion([5])]),
        ]
    return Submission(
        lease_id="L7",
        policy_version=version,
        groups=[GroupResult(prompt_id=pid, completions=items) for pid, items in groups],
        generation_seconds=1.5,
    )


def reject_reason(sub: Submission, current_version: int = 4) -> str:
    with pytest.raises(Refused) as caught:
        check_submission(sub, LEASE, CONFIG, current_version, FakeTokenizer())
    assert str(caught.value).startswith(caught.value.reason + ": ")
    return caught.value.reason


def test_good_submission_returns_trainer_decoded_texts() -> None:
    texts = check_submission(submission(), LEASE, CONFIG, 4, FakeTokenizer())
    assert texts == [["ab", "c"], ["iiii", "e"]]


def test_lag_within_max_staleness_is_accepted() -> None:
    # sampled at 4, trainer at 5, max_staleness 1
    assert check_submission(submission(), LEASE, CONFIG, 5, FakeTokenizer())[0] == ["ab", "c"]


def test_version_mismatch() -> None:
    assert reject_reason(submission(version=3)) == "version_mismatch"
    assert reject_reason(submission(version=5), current_version=5) == "version_mismatch"


def test_stale_version() -> None:
    # leased and sampled at 4; trainer at 6: lag 2 > max_staleness 1
    assert reject_reason(submission(), current_version=6) == "stale_version"


def test_wrong_prompts() -> None:
    good = [completion([1, 2]), completion([3])]
    swapped = [("p8", good), ("p3", good)]
    assert reject_reason(submission(swapped)) == "wrong_prompts"
    assert reject_reason(submission([("p3", good)])) == "wrong_prompts"
    extra = [("p3", good), ("p8", good), ("p9", good)]
    assert reject_reason(submission(extra)) == "wrong_prompts"
    renamed = [("p3", good), ("p80", good)]
    assert reject_reason(submission(renamed)) == "wrong_prompts"


def test_wrong_group_size() -> None:
    good = [completion([1, 2]), completion([3])]
    assert reject_reason(submission([("p3", good), ("p8", good[:1])])) == "wrong_group_size"
    three = [*good, completion([4])]
    assert reject_reason(submission([("p3", three), ("p8", good)])) == "wrong_group_size"


def test_bad_length_empty_completion() -> None:
    good = [completion([1, 2]), completion([3])]
    bad = [completion([1]), completion([], text="")]
    assert reject_reason(submission([("p3", good), ("p8", bad)])) == "bad_length"


def test_bad_length_too_long() -> None:
    good = [completion([1, 2]), completion([3])]
    bad = [completion([1, 2, 3, 4, 5]), completion([1])]  # 5 > max_completion_length 4
    assert reject_reason(submission([("p3", bad), ("p8", good)])) == "bad_length"


def test_bad_token() -> None:
    good = [completion([1, 2]), completion([3])]
    bad = [completion([1]), completion([10], text="x")]  # vocabulary is 0..9
    assert reject_reason(submission([("p3", good), ("p8", bad)])) == "bad_token"
    # the highest valid id is fine
    fine = [completion([9]), completion([0], text="")]
    assert check_submission(
        submission([("p3", good), ("p8", fine)]), LEASE, CONFIG, 4, FakeTokenizer()
    )[1] == ["i", ""]


def test_text_mismatch() -> None:
    good = [completion([1, 2]), completion([3])]
    lying = [completion([1, 2], text="ab"), completion([3], text="the answer is 42")]
    assert reject_reason(submission([("p3", good), ("p8", lying)])) == "text_mismatch"
    # the special token is dropped by the trainer's decoding, so "c</s>" does not match
    special = [completion([1]), completion([3, 0], text="c</s>")]
    assert reject_reason(submission([("p3", good), ("p8", special)])) == "text_mismatch"


def test_checks_run_in_protocol_order() -> None:
    # a stale submission for the wrong prompts reports the version problem first
    good = [completion([1, 2]), completion([3])]
    assert reject_reason(submission([("p9", good)], version=3)) == "version_mismatch"
    assert reject_reason(submission([("p9", good)]), current_version=6) == "stale_version"


# ---- replays and duplicates -------------------------------------------------------------


def test_an_accepted_lease_cannot_be_submitted_again() -> None:
    guard, indices = ReplayGuard(), [3, 8]
    guard.check_lease("L7")
    guard.remember(submission(), indices)
    with pytest.raises(Refused, match="already accepted") as caught:
        guard.check_lease("L7")
    assert caught.value.reason == "duplicate"


def test_completions_accepted_before_for_the_same_prompt_are_duplicates() -> None:
    guard, indices = ReplayGuard(), [3, 8]
    guard.remember(submission(), indices)
    copied = [("p3", [completion([4]), completion([1, 2])]), ("p8", [completion([5])] * 2)]
    with pytest.raises(Refused, match="prompt p3: completion 1 repeats") as caught:
        guard.check(submission(copied), indices)
    assert caught.value.reason == "duplicate"


def test_same_tokens_with_other_logprobs_or_another_prompt_are_not_duplicates() -> None:
    guard, indices = ReplayGuard(), [3, 8]
    guard.remember(submission(), indices)
    resampled = completion([1, 2]).model_copy(update={"logprobs": [-0.25, -0.5]})
    fresh = [completion([6]), completion([7])]
    guard.check(submission([("p3", [resampled, completion([4])]), ("p8", fresh)]), indices)
    guard.check(submission(), [4, 9])  # the same completions for other prompts
    # honest repeats inside one submission are normal (short, confident answers)
    ReplayGuard().check(submission([("p3", [completion([3])] * 2)] * 2), indices)


# ---- the log-prob check -----------------------------------------------------------------

STRICT = LogprobBand("strict", tolerance=1e-3, stale_tolerance=1.5)
LOOSE = LogprobBand("loose", tolerance=1e-3, stale_tolerance=1.5)


def failed_rows(
    trainer: list[list[float]], worker: list[list[float]], lags: list[int], band: LogprobBand
) -> list[int]:
    """Rows that fail; a 0.0 in `worker` beyond a row's length marks padding (see `lengths`)."""
    import torch

    width = max(len(row) for row in trainer)
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in trainer])
    pad = [[*row, *[0.0] * (width - len(row))] for row in trainer]
    theirs = [[*row, *[-50.0] * (width - len(row))] for row in worker]  # garbage at padding
    verdict = logprob_verdict(
        torch.tensor(pad), torch.tensor(theirs), mask, torch.tensor(lags), band
    )
    return verdict.failed.nonzero().flatten().tolist()


def test_strict_band_fails_a_sequence_with_one_token_off() -> None:
    trainer = [[-1.0, -2.0, -0.5], [-1.0, -2.0, -0.5], [-3.0]]
    worker = [[-1.0 + 6e-5, -2.0 - 6e-5, -0.5], [-1.0, -2.0 + 0.01, -0.5], [-3.0]]
    assert failed_rows(trainer, worker, [0, 0, 0], STRICT) == [1]


def test_loose_band_allows_bf16_noise_but_not_a_large_mean_or_many_far_tokens() -> None:
    noisy = [-1.0 + (0.08 if k % 2 else -0.08) for k in range(40)]
    one_far = [-1.0] * 39 + [-1.45]  # a single token off by 0.45: still noise
    far = [-1.0] * 37 + [-2.0] * 3  # 7.5% of tokens off by 1.0
    shifted = [-1.15] * 40  # mean |gap| 0.15
    trainer = [[-1.0] * 40] * 4
    assert failed_rows(trainer, [noisy, one_far, far, shifted], [0] * 4, LOOSE) == [2, 3]
    assert failed_rows(trainer, [noisy, one_far, far, shifted], [0] * 4, STRICT) == [0, 1, 2, 3]


def test_older_samples_are_judged_on_the_mean_gap_only() -> None:
    trainer = [[-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0]]
    worker = [[-1.9, -1.0], [-0.1, -0.1], [-1.0, -2.0]]  # mean gaps 0.95, 1.4 ... and 0
    assert failed_rows(trainer, worker, [1, 2, 1], STRICT) == []
    assert failed_rows(trainer, [[-1.0, -5.5], *worker[1:]], [1, 2, 1], STRICT) == [0]
    assert failed_rows(trainer, worker, [0, 0, 0], STRICT) == [0, 1]


def test_an_impossible_logprob_fails_and_off_checks_nothing() -> None:
    trainer = [[-1.0, -2.0], [-1.0, -2.0]]
    worker = [[-1.0, float("-inf")], [-1.0, -9.0]]
    assert failed_rows(trainer, worker, [0, 3], STRICT) == [0, 1]
    assert failed_rows(trainer, worker, [0, 3], LogprobBand("off", 1e-3, 1.5)) == []


def test_auto_mode_is_strict_for_float32_and_loose_otherwise() -> None:
    assert LogprobBand.from_config(Config()).mode == "strict"
    assert LogprobBand.from_config(Config(model={"dtype": "bfloat16"})).mode == "loose"
    forced = Config(trainer={"logprob_check": "loose", "logprob_tolerance": 0.01})
    assert LogprobBand.from_config(forced) == LogprobBand("loose", 0.01, 1.5)


# ---- the log-prob check on the real tiny model, through train_step -------------------------


# A few of the model's parameters, from the first layer to the last; their gradients are compared.
WATCHED = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
    "model.norm.weight",
)


class GradientRecorder:
    """Stands in for the optimizer: keeps the gradients of WATCHED it was asked to apply."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.gradients: dict[str, Any] = {}
        self.param_groups: list[dict[str, Any]] = [{}]  # the step sets a learning rate here

    def step(self) -> None:
        parameters = dict(self.model.named_parameters())
        self.gradients = {name: parameters[name].grad.clone() for name in WATCHED}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)


@pytest.fixture(scope="module")
def tiny(model_path: str) -> tuple[Any, Any, list[list[int]], list[Any]]:
    """The real model and tokenizer, two prompts and honest samples (2 each) from the HF backend."""
    import torch

    from swarmrl.base.models import load_model, load_tokenizer
    from swarmrl.protocol.messages import SamplingParams
    from swarmrl.rollout.hf_backend import HFBackend

    torch.manual_seed(0)
    tokenizer, model = load_tokenizer(model_path), load_model(model_path)
    data = Config().data
    prompts = [
        prompt_token_ids(data, tokenizer, prompt_text(data, tokenizer, f"What is {question}?"))
        for question in ("69 + 6", "18 + 9")
    ]
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=8)
    samples = HFBackend(model, tokenizer).generate(prompts, 2, sampling, [1, 2])
    return model, tokenizer, prompts, samples


def honest_groups(prompts: list[list[int]], samples: list[Any]) -> list[ScoredGroup]:
    return [
        ScoredGroup(
            index,
            prompt,
            [s.token_ids for s in group],
            [s.logprobs for s in group],
            [1.0, 0.0],
            "honest",
            0,
        )
        for index, (prompt, group) in enumerate(zip(prompts, samples, strict=True))
    ]


def forged_groups(tokenizer: Any, prompts: list[list[int]], claimed: float) -> list[ScoredGroup]:
    """Hand-written answers, tokenized, with made-up log-probs: never sampled from the model."""
    texts = [("The answer is 75.", "I think it is 12"), ("27", "27, because 18 + 9 = 27.")]
    groups = []
    for index, (prompt, pair) in enumerate(zip(prompts, texts, strict=True)):
        ids = [
            [*tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id] for t in pair
        ]
        logprobs = [[claimed] * len(i) for i in ids]
        groups.append(ScoredGroup(10 + index, prompt, ids, logprobs, [1.0, 0.0], "forger", 0))
    return groups


def recorded_step(
    model: Any, groups: list[ScoredGroup], check: str, pad_id: int
) -> tuple[dict[str, Any], list[LogprobMismatch], dict[str, float]]:
    config = Config(
        sampling=SamplingConfig(num_generations=2, max_completion_length=16),
        trainer=TrainerConfig(max_grad_norm=1e9, logprob_check=check),
    )
    recorder = GradientRecorder(model)
    stats, mismatches = train_step(model, recorder, groups, config, pad_id, version=0)
    return recorder.gradients, mismatches, stats


def test_hand_written_completions_are_masked_out_before_backward_and_honest_ones_pass(
    tiny: tuple[Any, Any, list[list[int]], list[Any]],
) -> None:
    import torch

    model, tokenizer, prompts, samples = tiny
    honest, forged = honest_groups(prompts, samples), forged_groups(tokenizer, prompts, -0.5)
    pad = tokenizer.pad_token_id
    mixed, mismatches, stats = recorded_step(model, honest + forged, "strict", pad)
    assert {(m.worker_id, m.prompt_index) for m in mismatches} == {("forger", 10), ("forger", 11)}
    assert len(mismatches) == 4 and stats["logprob_rejected"] == 4
    assert all(m.max_gap > 0.1 for m in mismatches)
    # The forged sequences added nothing: the gradient is the honest one, scaled by the share
    # of the step's tokens the honest sequences hold (the step's normaliser counts all).
    alone, none, _ = recorded_step(model, honest, "strict", pad)
    assert none == []
    tokens = sum(len(c) for g in honest for c in g.completion_token_ids)
    share = tokens / (tokens + sum(len(c) for g in forged for c in g.completion_token_ids))
    # (Other padding moves tiny elements by float rounding: tolerance relative to the largest.)
    for name, gradient in alone.items():
        largest = float(gradient.abs().max()) * share
        torch.testing.assert_close(mixed[name], gradient * share, rtol=1e-3, atol=1e-4 * largest)
    # Unchecked, the forged sequences would have moved the weights.
    unchecked, _, _ = recorded_step(model, honest + forged, "off", pad)
    for name, gradient in alone.items():
        largest = float(gradient.abs().max()) * share
        assert not torch.allclose(unchecked[name], gradient * share, atol=0.1 * largest), name


def test_honest_samples_pass_after_the_trainer_moved_on_and_forgeries_still_fail(
    tiny: tuple[Any, Any, list[list[int]], list[Any]],
) -> None:
    """Sampled one AdamW step ago (lag 1): the stale band, mean |gap| <= 1.5, applies."""
    import copy

    import torch

    model, tokenizer, prompts, samples = tiny
    moved = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(moved.parameters(), lr=2e-5)
    config = Config(sampling=SamplingConfig(num_generations=2, max_completion_length=16))
    groups = honest_groups(prompts, samples) + forged_groups(tokenizer, prompts, -0.05)
    stats, _ = train_step(moved, optimizer, groups, config, tokenizer.pad_token_id, version=0)
    assert stats["grad_norm"] > 0
    _, mismatches = train_step(moved, optimizer, groups, config, tokenizer.pad_token_id, version=1)
    assert {m.worker_id for m in mismatches} == {"forger"}
    assert all(m.lag == 1 for m in mismatches)
