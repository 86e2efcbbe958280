"""Tests for swarmrl.trainer.verify: every reject reason, and the texts of a good submission."""

import pytest

from swarmrl.config import Config, SamplingConfig, TrainerConfig
from swarmrl.protocol.messages import Completion, GroupResult, Submission
from swarmrl.trainer.leases import OpenLease
from swarmrl.trainer.verify import SubmissionError, check_submission

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
    with pytest.raises(SubmissionError) as caught:
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
