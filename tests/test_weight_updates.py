"""Compressed weight updates: the DeMo codec by hand, the sparse codec, replay, keyframes."""

from __future__ import annotations

import math

import pytest
import torch

from swarmrl.protocol import messages as m
from swarmrl.protocol.codecs import decoupled_momentum as demo
from swarmrl.protocol.codecs import get_codec, sparse
from swarmrl.protocol.codecs.full import encode_full
from swarmrl.protocol.codecs.interface import PayloadError, weights_fingerprint
from swarmrl.rollout.replica import NeedKeyframe, Replica
from swarmrl.trainer.optimizers import DemoOptimizer, Publication
from swarmrl.trainer.publish import Delta, Published, WeightPublisher

X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])


def test_dct_basis_is_orthonormal_and_matches_the_formula() -> None:
    r = 1 / math.sqrt(2)
    assert torch.allclose(demo.dct_basis(2), torch.tensor([[r, r], [r, -r]], dtype=torch.float64))
    basis = demo.dct_basis(64)
    assert torch.allclose(basis @ basis.T, torch.eye(64, dtype=torch.float64), atol=1e-12)


def test_all_coefficients_round_trip_and_padding_is_cropped() -> None:
    x = torch.randn(70, 130, generator=torch.Generator().manual_seed(0))
    everything = demo.DemoSettings(topk=64 * 64, chunk=64, value_bits=16)
    selection = demo.select(x, everything)
    assert len(selection.positions) == 2 * 3  # 70 x 130 in 64 x 64 blocks, padded
    assert torch.allclose(demo.dense(selection, (70, 130), 64), x, atol=1e-5)


def test_top_k_selection_by_hand() -> None:
    # B X B^T with B the 2-point DCT: [[5, -1], [-2, 0]]; flattened positions 0, 1, 2, 3.
    top1 = demo.select(X, demo.DemoSettings(topk=1, chunk=2))
    assert top1.positions.tolist() == [[0]] and top1.values.tolist() == [[pytest.approx(5.0)]]
    top2 = demo.select(X, demo.DemoSettings(topk=2, chunk=2))
    assert top2.positions.tolist() == [[0, 2]]
    assert top2.values.tolist() == [[pytest.approx(5.0), pytest.approx(-2.0)]]
    # what the two coefficients stand for: 5 * outer(b0, b0) - 2 * outer(b1, b0)
    assert torch.allclose(demo.dense(top2, (2, 2), 2), torch.tensor([[1.5, 1.5], [3.5, 3.5]]))


def test_payload_layout_size_and_determinism_by_hand() -> None:
    settings = demo.DemoSettings(topk=2, chunk=2, value_bits=1)
    selection = demo.select(X, settings)
    payload = demo.encode({"w": selection}, {"w": (2, 2)}, settings, 0.5, 0.0)
    # 38-byte header + 2 codes of (2 position bits + 1 sign bit) = 6 bits -> 1 byte
    assert len(payload) == 38 + 1
    # codes 0b000 (position 0, +) and 0b101 (position 2, -) -> bits 000101, padded: 0b00010100
    assert payload[-1] == 0b00010100
    assert payload == demo.encode({"w": selection}, {"w": (2, 2)}, settings, 0.5, 0.0)
    update = demo.decode(payload, {"w": (2, 2)})
    assert update.selections["w"].positions.tolist() == [[0, 2]]
    assert update.selections["w"].values.tolist() == [[1.0, -1.0]]
    assert (update.lr, update.weight_decay, update.settings) == (0.5, 0.0, settings)


def test_sign_replay_by_hand_including_exact_zeros() -> None:
    # +outer(b0, b0) - outer(b1, b0) = [[0, 0], [1, 1]]: the zeros must stay exactly zero.
    settings = demo.DemoSettings(topk=2, chunk=2, value_bits=1)
    payload = demo.encode({"w": demo.select(X, settings)}, {"w": (2, 2)}, settings, 0.5, 0.0)
    weights = {"w": torch.zeros(2, 2)}
    demo.apply_update(payload, weights)
    assert weights["w"].tolist() == [[0.0, 0.0], [-0.5, -0.5]]
    # top-1: +outer(b0, b0) is positive everywhere; weight decay 0.5 first shrinks p by 25%
    top1 = demo.DemoSettings(topk=1, chunk=2)
    payload = demo.encode({"w": demo.select(X, top1)}, {"w": (2, 2)}, top1, 0.5, 0.5)
    weights = {"w": torch.ones(2, 2)}
    demo.apply_update(payload, weights)
    assert weights["w"].tolist() == [[0.25, 0.25], [0.25, 0.25]]


def bad_payloads(payload: bytes) -> dict[str, bytes]:
    return {
        "truncated": payload[:-1],
        "padded": payload + b"\0",
        "header only": payload[:20],
        "not demo": b"XXXX" + payload[4:],
        "lr not finite": payload[:10] + b"\x00" * 6 + b"\xf0\x7f" + payload[18:],
    }


@pytest.mark.parametrize("case", list(bad_payloads(b"")))
def test_malformed_demo_payloads_are_refused_and_touch_nothing(case: str) -> None:
    settings = demo.DemoSettings(topk=1, chunk=4)
    shapes = {"a": (8, 8), "b": (5,)}
    tensors = {n: torch.randn(s) for n, s in shapes.items()}
    selections = {n: demo.select(t, settings) for n, t in tensors.items()}
    payload = demo.encode(selections, shapes, settings, 1e-3, 0.0)
    before = {n: t.clone() for n, t in tensors.items()}
    with pytest.raises(PayloadError):
        demo.apply_update(bad_payloads(payload)[case], tensors)
    with pytest.raises(PayloadError, match="layout"):
        demo.apply_update(payload, {"a": tensors["a"], "b": torch.zeros(6)})
    assert all(torch.equal(before[n], tensors[n]) for n in tensors)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 130), torch.nn.Tanh(), torch.nn.Linear(130, 3))


def test_demo_optimizer_replayed_by_a_worker_holds_the_trainer_weights_bit_for_bit() -> None:
    model = tiny_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = DemoOptimizer(
        list(model.named_parameters()), 1e-3, 0.01, 0.9, demo.DemoSettings(topk=2, chunk=64)
    )
    worker = {n: t.clone() for n, t in start.items()}
    for step in range(20):
        x = torch.randn(8, 96, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        demo.apply_update(optimizer.last_payload, worker)
    trainer = {n: p.detach() for n, p in model.named_parameters()}
    assert weights_fingerprint(worker) == weights_fingerprint(trainer)
    assert not torch.equal(worker["0.weight"], start["0.weight"])
    # sign steps: every element moved by a multiple of lr (weight decay aside), at most 20 lr
    assert (trainer["0.weight"] - start["0.weight"]).abs().max() <= 20 * 1e-3 * 1.01 + 0.01


def test_error_feedback_keeps_what_was_not_sent() -> None:
    weight = torch.nn.Parameter(X.clone())
    optimizer = DemoOptimizer([("w", weight)], 1.0, 0.0, 0.5, demo.DemoSettings(topk=1, chunk=2))
    weight.grad = X.clone()
    optimizer.step()
    # m = 0.5 * 0 + 1 * X; sent: 5 * outer(b0, b0) = 2.5 everywhere; kept: X - 2.5
    assert torch.allclose(optimizer.state[weight]["momentum"], X - 2.5)
    assert weight.detach().tolist() == (X - 1).tolist()  # p -= lr * sign(+2.5)


def test_sparse_codec_sends_exactly_the_changed_bf16_elements() -> None:
    old = {"a": torch.randn(300).to(torch.bfloat16), "b": torch.randn(4, 5).to(torch.bfloat16)}
    new = {n: t.clone() for n, t in old.items()}
    new["a"][[3, 200]] += 1
    new["b"][2, 1] = 7
    payload = sparse.encode(old, new)
    assert len(payload) == sparse.HEADER.size + math.ceil(320 / 8) + 3 * 2
    held = {n: t.clone() for n, t in old.items()}
    assert sparse.apply_update(payload, held) == 3
    assert all(torch.equal(held[n], new[n]) for n in new)
    with pytest.raises(PayloadError, match="truncated"):
        sparse.apply_update(payload[:-1], held)
    with pytest.raises(PayloadError, match="bf16"):
        sparse.apply_update(payload, {n: t.float() for n, t in old.items()})


def published(version: int, delta: bool = True) -> Published:
    return Published(version, f"fp{version}", b"K" * 10, Delta("demo", b"D") if delta else None)


def test_publisher_sends_the_missed_chain_or_a_keyframe() -> None:
    publisher = WeightPublisher(published(0, delta=False), history=3)
    for version in range(1, 6):
        publisher.publish(published(version))
    assert publisher.catch_up(5) == []
    chain = publisher.catch_up(3)
    assert [(u.version, u.base_version, u.codec, u.fingerprint) for u, _ in chain] == [
        (4, 3, "demo", "fp4"),
        (5, 4, "demo", "fp5"),
    ]
    for behind in (0, 1, -1):  # beyond the history of 3, or holding nothing trainer-made
        [(update, blobs)] = publisher.catch_up(behind)
        assert (update.codec, update.version, update.base_version) == ("full", 5, -1)
        assert blobs == (b"K" * 10,)


def test_keyframe_every_n_versions_and_after_a_gap() -> None:
    publisher = WeightPublisher(published(0, delta=False), keyframe_every=4)
    for version in range(1, 6):
        publisher.publish(published(version))
    assert [u.codec for u, _ in publisher.catch_up(4)] == ["demo"]
    assert [u.codec for u, _ in publisher.catch_up(3)] == ["full"]  # crosses version 4
    publisher.publish(published(7))  # version 6 never published: the chain is broken
    assert [u.codec for u, _ in publisher.catch_up(5)] == ["full"]


def replica_with(tensors: dict[str, torch.Tensor]) -> Replica:
    replica = Replica("/nonexistent", "float32")
    replica.tensors = {n: t.clone() for n, t in tensors.items()}
    return replica


def demo_update(model: torch.nn.Module, version: int) -> tuple[m.WeightUpdate, bytes]:
    optimizer = DemoOptimizer(list(model.named_parameters()), 1e-3, 0.0, 0.9, demo.DemoSettings())
    publication = Publication(optimizer, get_codec("demo"))
    model(torch.randn(2, 96)).sum().backward()
    optimizer.step()
    out = publication.published(version, {n: p.detach() for n, p in model.named_parameters()})
    assert out.delta is not None
    update = m.WeightUpdate(
        version=version,
        codec="demo",
        fingerprint=out.fingerprint,
        num_bytes=len(out.delta.payload),
        base_version=version - 1,
    )
    return update, out.delta.payload


def test_replica_replays_checks_the_fingerprint_and_asks_for_keyframes() -> None:
    model = tiny_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    update, payload = demo_update(model, 4)
    replica = replica_with(start)
    with pytest.raises(NeedKeyframe, match="holds version 2"):
        replica.apply(update, payload, held_version=2)  # missed version 3
    assert all(torch.equal(replica.tensors[n], start[n]) for n in start)
    held = replica.apply(update, payload, held_version=3)
    assert weights_fingerprint(held) == update.fingerprint
    drifted = replica_with({n: t + 1e-6 for n, t in start.items()})
    with pytest.raises(NeedKeyframe, match="drifted"):
        drifted.apply(update, payload, held_version=3)
    assert drifted.tensors is None  # only a keyframe can help now
    keyframe = m.WeightUpdate(
        version=4, codec="full", fingerprint=update.fingerprint, num_bytes=len(payload)
    )
    assert weights_fingerprint(drifted.apply(keyframe, encode_full(held), -1)) == update.fingerprint
    with pytest.raises(NeedKeyframe, match="codec"):
        replica.apply(update.model_copy(update={"codec": "zip"}), payload, held_version=3)


def test_keyframes_only_now_and_then_and_a_worker_catches_up_from_the_newest() -> None:
    model = tiny_model()
    optimizer = DemoOptimizer(list(model.named_parameters()), 1e-3, 0.0, 0.9, demo.DemoSettings())
    publication = Publication(optimizer, get_codec("demo"), keyframe_interval=3)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    publisher = WeightPublisher(publication.published(0, weights, after_step=False), history=2)
    made = []
    for version in range(1, 6):
        model(torch.randn(2, 96)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        published = publication.published(version, weights)
        made.append(published.keyframe is not None)
        publisher.publish(published)
    assert made == [False, False, True, False, False]  # versions 3 (and 0): every 3rd
    assert [(u.version, u.base_version) for u, _ in publisher.catch_up(-1)] == [
        (3, -1),  # the newest keyframe (the base and chain from 0 are gone: history 2) ...
        (4, 3),
        (5, 4),  # ... then the deltas since
    ]
    assert [u.version for u, _ in publisher.catch_up(4)] == [5]
