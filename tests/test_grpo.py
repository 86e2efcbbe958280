"""Tests for swarmrl.trainer.grpo; every expected value is worked out by hand in the comments."""

import math

import pytest
import torch

from swarmrl.trainer.grpo import (
    BatchNormaliser,
    LossConfig,
    aggregate_loss,
    entropy_from_logits,
    group_advantages,
    per_token_loss,
    sequence_logprobs_from_logits,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
LOSS_TYPES = ["grpo", "dr_grpo", "dapo", "bnpo"]
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # groups of 4


def close(actual: torch.Tensor, expected: list | float) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6
    )


# --- advantages --------------------------------------------------------------------------


def test_group_advantages_group_scaling() -> None:
    # group 1 [1,0,0,1]: mean 0.5, deviations ±0.5, unbiased var (4 * 0.25) / 3 = 1/3
    # -> std sqrt(1/3) = 0.57735, A = ±0.5 / (0.57735 + 1e-4) = ±0.865875
    # group 2 [1,1,1,1]: mean 1, deviations 0, std 0 -> A = 0 / 1e-4 = 0
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(group_advantages(REWARDS, 4, "group"), [a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])


def test_group_advantages_batch_scaling() -> None:
    # centred on the group means as above: [0.5,-0.5,-0.5,0.5, 0,0,0,0]
    # batch std over all 8 rewards: mean 6/8 = 0.75; squared deviations 6 * 0.25^2 = 0.375
    # and 2 * 0.75^2 = 1.125, sum 1.5, unbiased var 1.5 / 7 = 3/14 -> std 0.462910
    a = 0.5 / (math.sqrt(3 / 14) + 1e-4)  # 1.079898
    close(group_advantages(REWARDS, 4, "batch"), [a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])


def test_group_advantages_no_scaling() -> None:
    close(group_advantages(REWARDS, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])


def test_group_advantages_rejects_ragged_batch() -> None:
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(7), 4, "group")


# --- per-token loss ----------------------------------------------------------------------


def _clip_inputs() -> tuple[torch.Tensor, ...]:
    # old = behavior = 0, so ratio = exp(logprobs) = [1.5, 0.5, 1.1] and the IS weight is 1.
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]] * 2)
    zeros = torch.zeros(2, 3)
    return logprobs.requires_grad_(), zeros, zeros.clone(), torch.tensor([1.0, -1.0])


def test_per_token_loss_clips_asymmetrically() -> None:
    logprobs, old, behavior, adv = _clip_inputs()
    cfg = LossConfig(epsilon=0.2, epsilon_high=0.28)  # clip range [0.8, 1.28]
    loss, stats = per_token_loss(logprobs, old, behavior, adv, torch.ones(2, 3), cfg)
    # A=+1: -min(r, clip(r)): r=1.5 -> -min(1.5, 1.28) = -1.28 (clipped high)
    #                         r=0.5 -> -min(0.5, 0.8)  = -0.5  (not clipped: pessimistic side)
    #                         r=1.1 -> -1.1 (inside the range)
    # A=-1: -min(-r, -clip(r)): r=1.5 -> -min(-1.5, -1.28) = 1.5 (not clipped)
    #                           r=0.5 -> -min(-0.5, -0.8)  = 0.8 (clipped low)
    #                           r=1.1 -> 1.1
    close(loss, [[-1.28, -0.5, -1.1], [1.5, 0.8, 1.1]])
    close(stats["clip_ratio_high"], 1 / 6)  # only (r=1.5, A>0) of 6 real tokens
    close(stats["clip_ratio_low"], 1 / 6)  # only (r=0.5, A<0)
    close(stats["is_weight_mean"], 1.0)
    close(stats["is_truncated_frac"], 0.0)
    close(stats["behavior_logprob_gap"], 0.0)
    assert "kl" not in stats
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


def test_gradients_flow_through_logprobs_only() -> None:
    logprobs, old, behavior, adv = _clip_inputs()
    old.requires_grad_()
    behavior.requires_grad_()
    adv.requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # last token of row 2 is padding
    loss, _ = per_token_loss(logprobs, old, behavior, adv, mask, LossConfig())  # range [0.8, 1.2]
    loss.sum().backward()
    # d(-r*A)/d logprob = -r*A where the unclipped term is the min, 0 where the clipped one is
    # A=+1: r=1.5 clipped -> 0; r=0.5 -> -0.5; r=1.1 -> -1.1
    # A=-1: r=1.5 -> +1.5;  r=0.5 clipped -> 0; r=1.1 is padding -> 0
    assert logprobs.grad is not None
    close(logprobs.grad, [[0.0, -0.5, -1.1], [1.5, 0.0, 0.0]])
    assert old.grad is None and behavior.grad is None and adv.grad is None


def test_truncated_importance_weight_and_cap() -> None:
    # old - behavior = [log 3, -log 2, 0, padding(NaN)] -> raw weight [3, 0.5, 1, -]
    # cap 2 -> weight [2, 0.5, 1]; ratio = 1 and A = 1 so loss = -weight
    logprobs = torch.zeros(1, 4, requires_grad=True)
    behavior = torch.tensor([[-LN3, LN2, 0.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    cfg = LossConfig(sampler_clip_max=2.0)
    loss, stats = per_token_loss(logprobs, torch.zeros(1, 4), behavior, torch.ones(1), mask, cfg)
    close(loss, [[-2.0, -0.5, -1.0, 0.0]])
    close(stats["is_weight_mean"], 3.5 / 3)  # (2 + 0.5 + 1) / 3
    close(stats["is_truncated_frac"], 1 / 3)  # only the weight 3 exceeded the cap
    close(stats["behavior_logprob_gap"], math.log(6.0) / 3)  # (log 3 + log 2 + 0) / 3
    loss.sum().backward()
    assert logprobs.grad is not None
    close(logprobs.grad, [[-2.0, -0.5, -1.0, 0.0]])  # -r * A * weight, weight held constant


def test_clip_and_importance_weight_compose() -> None:
    # ratio 1.5 clipped to 1.2 for A=+1, times the capped weight min(3, 2) = 2 -> -2.4
    logprobs = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, _ = per_token_loss(
        logprobs,
        torch.zeros(1, 1),
        torch.tensor([[-LN3]]),
        torch.ones(1),
        torch.ones(1, 1),
        LossConfig(),
    )
    close(loss, [[-2.4]])


def test_k3_kl_term() -> None:
    # A = 0, so only beta * kl remains. kl = exp(ref - lp) - (ref - lp) - 1:
    # ref - lp = log 2  -> 2 - log 2 - 1   = 0.306853
    # ref - lp = -log 2 -> 0.5 + log 2 - 1 = 0.193147;  mean = (1 - log 2 + log 2 - 0.5) / 2 = 0.25
    logprobs = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[LN2, -LN2]])
    cfg = LossConfig(beta=0.1)
    zeros = torch.zeros(1, 2)
    loss, stats = per_token_loss(
        logprobs, zeros, zeros, torch.zeros(1), torch.ones(1, 2), cfg, ref_logprobs=ref
    )
    close(loss, [[0.1 * (1 - LN2), 0.1 * (LN2 - 0.5)]])
    close(stats["kl"], 0.25)
    loss.sum().backward()
    # d kl / d lp = 1 - exp(ref - lp): 1 - 2 = -1 and 1 - 0.5 = 0.5, times beta
    assert logprobs.grad is not None
    close(logprobs.grad, [[-0.1, 0.05]])


def test_kl_requires_reference() -> None:
    zeros = torch.zeros(1, 2)
    with pytest.raises(ValueError):
        per_token_loss(zeros, zeros, zeros, torch.zeros(1), zeros, LossConfig(beta=0.1))


def test_loss_config_rejects_unknown_loss_type() -> None:
    with pytest.raises(ValueError):
        LossConfig(loss_type="ppo")  # type: ignore[arg-type]


# --- aggregation -------------------------------------------------------------------------

TOKEN_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # 3 and 5, 6 are padding
SPLITS = [slice(0, 1), slice(1, 3), slice(3, 4)]  # micro-batches of the 4-sequence step below


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        ("grpo", 2.75),  # row means (1+2)/2 = 1.5 and 4/1 = 4 -> (1.5 + 4) / 2 sequences
        ("bnpo", 7 / 3),  # (1 + 2 + 4) / 3 real tokens
        ("dapo", 7 / 3),
        ("dr_grpo", 0.875),  # 7 / (2 sequences * max_completion_length 4)
    ],
)
def test_aggregate_loss_small_example(loss_type: str, expected: float) -> None:
    cfg = LossConfig(loss_type=loss_type, max_completion_length=4)  # type: ignore[arg-type]
    close(aggregate_loss(TOKEN_LOSS, MASK, cfg, BatchNormaliser(2, 3)), expected)


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        # rows (lengths 3, 1, 0, 2): sums 6, 4, 0, 21 (total 31 over 6 tokens), means 2, 4, 0, 10.5
        ("grpo", 4.125),  # (2 + 4 + 0 + 10.5) / 4
        ("bnpo", 31 / 6),
        ("dapo", 31 / 6),
        ("dr_grpo", 31 / 12),  # 31 / (4 * 3)
    ],
)
def test_micro_batches_sum_to_full_batch(loss_type: str, expected: float) -> None:
    token_loss = torch.arange(1.0, 13.0).view(4, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    cfg = LossConfig(loss_type=loss_type, max_completion_length=3)  # type: ignore[arg-type]
    norm = BatchNormaliser(num_sequences=4, num_tokens=6)
    full = aggregate_loss(token_loss, mask, cfg, norm)
    close(full, expected)
    parts = sum(aggregate_loss(token_loss[s], mask[s], cfg, norm) for s in SPLITS)
    close(parts, expected)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_gradients_match_full_batch(loss_type: str) -> None:
    gen = torch.Generator().manual_seed(0)
    base = -torch.rand(4, 3, generator=gen)
    old = base + 0.3 * torch.randn(4, 3, generator=gen)
    behavior = old + 0.5 * torch.randn(4, 3, generator=gen)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    cfg = LossConfig(loss_type=loss_type, max_completion_length=3)  # type: ignore[arg-type]
    norm = BatchNormaliser(num_sequences=4, num_tokens=6)

    full_lp = base.clone().requires_grad_()
    tok, _ = per_token_loss(full_lp, old, behavior, adv, mask, cfg)
    full = aggregate_loss(tok, mask, cfg, norm)
    full.backward()

    split_lp = base.clone().requires_grad_()
    total = torch.zeros(())
    for s in SPLITS:
        tok, _ = per_token_loss(split_lp[s], old[s], behavior[s], adv[s], mask[s], cfg)
        part = aggregate_loss(tok, mask[s], cfg, norm)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(split_lp.grad, full_lp.grad)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_length_sequences_give_no_nan(loss_type: str) -> None:
    cfg = LossConfig(loss_type=loss_type, beta=0.1)  # type: ignore[arg-type]
    logprobs = torch.full((2, 2), -1.0, requires_grad=True)
    zeros = torch.zeros(2, 2)
    for mask, norm in [
        (torch.tensor([[1.0, 0.0], [0.0, 0.0]]), BatchNormaliser(2, 1)),  # one empty sequence
        (zeros, BatchNormaliser(2, 0)),  # an all-padding micro-batch
    ]:
        tok, stats = per_token_loss(
            logprobs, logprobs.detach(), zeros, torch.ones(2), mask, cfg, ref_logprobs=zeros
        )
        loss = aggregate_loss(tok, mask, cfg, norm)
        loss.backward()
        assert torch.isfinite(loss)
        assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()
        assert all(torch.isfinite(v) for v in stats.values())
    close(loss, 0.0)


# --- log-probs and entropy ---------------------------------------------------------------


def test_sequence_logprobs_from_logits_hand_computed() -> None:
    # logits / T = [0, log 2, log 3] -> softmax [1, 2, 3] / 6 -> log-probs log(1/6), log(2/6), ...
    logits = torch.tensor([[[0.0, 2 * LN2, 2 * LN3], [2 * LN3, 0.0, 2 * LN2]]])
    ids = torch.tensor([[2, 0]])  # row 1 picks 3/6, row 2 picks the logit 2*log 3 -> 3/6 too
    out = sequence_logprobs_from_logits(logits, ids, temperature=2.0)
    close(out, [[math.log(0.5), math.log(0.5)]])
    ids = torch.tensor([[0, 2]])  # 1/6 and 2/6
    close(sequence_logprobs_from_logits(logits, ids, 2.0), [[-math.log(6.0), -LN3]])


def test_sequence_logprobs_bf16_and_many_rows() -> None:
    # 3 * 50 = 150 rows (more than one chunk); uniform over 4 tokens -> log(1/4) = -1.386294
    logits = torch.full((3, 50, 4), 7.0, dtype=torch.bfloat16, requires_grad=True)
    out = sequence_logprobs_from_logits(logits, torch.ones(3, 50, dtype=torch.long), 1.0)
    assert out.dtype == torch.float32 and out.shape == (3, 50)
    close(out, torch.full((3, 50), -math.log(4.0)).tolist())
    out.sum().backward()
    assert logits.grad is not None


def test_entropy_from_logits() -> None:
    # uniform over 4 -> log 4 = 1.386294
    # [1, 2, 3] / 6 -> -(1/6 log 1/6 + 2/6 log 2/6 + 3/6 log 3/6)
    #              = log 6 - (2 log 2 + 3 log 3) / 6 = 1.791759 - 0.780355 = 1.011404
    # a -inf logit has probability 0 and adds nothing: [0, 0, -inf, -inf] -> log 2
    ninf = float("-inf")
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [0.0, 2 * LN2, 2 * LN3, ninf], [0, 0, ninf, ninf]]]
    )
    out = entropy_from_logits(logits.requires_grad_(), temperature=2.0)
    assert not out.requires_grad
    close(out, [[math.log(4.0), 1.011404, LN2]])
    exact_in_bf16 = logits[:, [0, 2]].to(torch.bfloat16)  # zeros and -inf only
    out = entropy_from_logits(exact_in_bf16, temperature=2.0)
    assert out.dtype == torch.float32
    close(out, [[math.log(4.0), LN2]])


# ---- the newer loss variants, by hand ------------------------------------------------------


def one_token(logprob: float) -> torch.Tensor:
    return torch.tensor([[logprob]], requires_grad=True)


def test_cispo_weights_by_the_capped_ratio_and_differentiates_the_log_prob() -> None:
    # r = e^0.5 = 1.6487 > cap 1.5: weight 1.5 (detached); loss = -1.5 * A * logp = -1.5
    logprobs, ones = one_token(0.5), torch.ones(1, 1)
    cfg = LossConfig(
        loss_type="cispo", epsilon_high=1.5, sampler_clip_max=None, sampler_mode="token_mask"
    )
    loss, _ = per_token_loss(
        logprobs, torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([2.0]), ones, cfg
    )
    assert loss.item() == pytest.approx(-1.5)
    loss.sum().backward()
    assert logprobs.grad.item() == pytest.approx(-3.0)  # -cap * A: no gradient through the cap


def test_sapo_is_a_soft_gate_with_slope_one_at_ratio_one() -> None:
    for advantage, tau in ((1.0, 1.0), (-1.0, 1.05)):
        logprobs = one_token(0.0)  # r = 1: sigmoid(0) * 4 / tau = 2 / tau
        loss, _ = per_token_loss(
            logprobs,
            torch.zeros(1, 1),
            torch.zeros(1, 1),
            torch.tensor([advantage]),
            torch.ones(1, 1),
            LossConfig(loss_type="sapo"),
        )
        assert loss.item() == pytest.approx(-2.0 / tau * advantage)
        loss.sum().backward()
        assert logprobs.grad.item() == pytest.approx(-advantage)  # 4 * sigmoid'(0) = 1


def test_gspo_clips_the_mean_log_ratio_of_the_sequence() -> None:
    logprobs = torch.tensor([[0.2, 0.4]], requires_grad=True)  # mean 0.3: s = e^0.3 = 1.3499
    cfg = LossConfig(loss_type="grpo", importance_sampling_level="sequence")
    loss, stats = per_token_loss(
        logprobs, torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), cfg
    )
    assert loss[0].tolist() == pytest.approx([-1.2, -1.2])  # clipped at 1 + 0.2, every token
    assert stats["clip_ratio_high"].item() == 1.0


def test_delta_caps_the_unclipped_ratio_for_negative_advantages() -> None:
    logprobs = one_token(math.log(5.0))  # r = 5, A = -1: plain clip gives -min(-5, -1.2) = 5
    args = (torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    plain, _ = per_token_loss(logprobs, *args, LossConfig())
    capped, _ = per_token_loss(logprobs, *args, LossConfig(delta=4.0))
    assert plain.item() == pytest.approx(5.0) and capped.item() == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("mode", "clip_min", "expected"),
    [
        ("token_truncate", None, [2.0, math.exp(0.5)]),  # e^1 = 2.72 capped at 2
        ("token_mask", None, [0.0, math.exp(0.5)]),  # ... or dropped
        ("sequence_truncate", None, [2.0, 2.0]),  # e^(1 + 0.5) = 4.48 for the whole sequence
        ("sequence_mask", None, [0.0, 0.0]),
        ("token_truncate", 2.0, [2.0, 2.0]),  # e^0.5 = 1.65 raised to clip_min 2
    ],
)
def test_sampler_correction_modes(mode: str, clip_min: float | None, expected: list) -> None:
    from swarmrl.trainer.grpo import sampler_weight

    old, behavior = torch.zeros(1, 2), torch.tensor([[-1.0, -0.5]])  # gaps 1.0 and 0.5
    cfg = LossConfig(sampler_mode=mode, sampler_clip_min=clip_min, sampler_clip_max=2.0)
    weight, _ = sampler_weight(old, behavior, torch.ones(1, 2), cfg)
    assert weight.expand(1, 2)[0].tolist() == pytest.approx(expected)


def test_cispo_aggregates_over_tokens_and_sapo_over_sequences() -> None:
    token_loss = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    normaliser = BatchNormaliser(num_sequences=2, num_tokens=4)
    cispo = aggregate_loss(token_loss, mask, LossConfig(loss_type="cispo"), normaliser)
    sapo = aggregate_loss(token_loss, mask, LossConfig(loss_type="sapo"), normaliser)
    assert cispo.item() == pytest.approx(7 / 4)  # token sum / tokens
    assert sapo.item() == pytest.approx((1 + 4) / 2)  # mean of the per-sequence means


def test_overlong_penalty_ramps_over_the_buffer() -> None:
    from swarmrl.trainer.grpo import overlong_penalty

    assert overlong_penalty(28, max_length=32, buffer=4, factor=1.0) == 0.0
    assert overlong_penalty(30, max_length=32, buffer=4, factor=1.0) == -0.5
    assert overlong_penalty(32, max_length=32, buffer=4, factor=2.0) == -2.0
    assert overlong_penalty(32, max_length=32, buffer=0, factor=2.0) == 0.0  # off
