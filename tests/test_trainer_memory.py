"""What the trainer does to hold less memory changes no number: log-probs and their gradients
(bit for bit those of plain autograd), keyframe bytes (those of safetensors), malloc settings."""

import pytest
import torch
from safetensors.torch import save

from swarmrl.protocol.codecs.full import decode_full, encode_full
from swarmrl.protocol.codecs.interface import weights_fingerprint
from swarmrl.trainer.grpo import _CHUNK_ROWS, sequence_logprobs_from_logits
from swarmrl.trainer.memory import return_freed_tensors


def autograd_logprobs(logits, token_ids, temperature):
    """The chunked `gather - logsumexp` through plain autograd (what the trainer did before)."""
    flat_logits, flat_ids = logits.reshape(-1, logits.shape[-1]), token_ids.reshape(-1, 1)
    chunks = []
    for rows, ids in zip(flat_logits.split(_CHUNK_ROWS), flat_ids.split(_CHUNK_ROWS), strict=True):
        scaled = rows.float() / temperature
        chunks.append(scaled.gather(-1, ids).squeeze(-1) - torch.logsumexp(scaled, dim=-1))
    return torch.cat(chunks).view(token_ids.shape)


def logits_and_grad(function, dtype, temperature, masked_row):
    """Log-probs of (3, 100, 50) logits (several chunks of rows, the last one short) and the
    gradient of a weighted sum of them, with one row's weights zero (a masked sequence)."""
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(3, 101, 50, generator=generator) * 4
    logits = base.to(dtype).requires_grad_()
    ids = torch.randint(0, 50, (3, 100), generator=generator)
    weights = torch.randn(3, 100, generator=generator)
    weights[masked_row] = 0.0
    logprobs = function(logits[:, :-1], ids, temperature)
    (logprobs * weights).sum().backward()
    return logprobs.detach(), logits.grad


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_gradients_are_autograds_bit_for_bit(dtype, temperature):
    ours = logits_and_grad(sequence_logprobs_from_logits, dtype, temperature, masked_row=1)
    plain = logits_and_grad(autograd_logprobs, dtype, temperature, masked_row=1)
    assert same_bits(ours[0], plain[0])
    assert same_bits(ours[1], plain[1])  # signed zeros too: masked rows, the sliced-off position


def test_logprobs_match_log_softmax():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 7, 11, generator=generator, dtype=torch.float64).requires_grad_()
    ids = torch.randint(0, 11, (2, 7), generator=generator)
    expected = torch.log_softmax(logits.float() / 0.8, dim=-1).gather(-1, ids[..., None])[..., 0]
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    ours = sequence_logprobs_from_logits(logits, ids, 0.8)
    (grad,) = torch.autograd.grad(ours.sum(), logits)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the screening forward: no graph, same numbers
        assert torch.equal(sequence_logprobs_from_logits(logits, ids, 0.8), ours.detach())


def test_keyframe_bytes_are_safetensors_own():
    matrix = torch.randn(4, 6)
    tensors = {
        "model.b": torch.randn(3).to(torch.bfloat16),
        "model.a": matrix,
        "steps": torch.arange(4),
        "flags": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": matrix.t(),  # not contiguous
        "ünïcode": torch.randn(2, dtype=torch.float16),
    }
    payload = encode_full(tensors)
    assert payload == save({name: t.contiguous() for name, t in tensors.items()})
    assert isinstance(payload, bytes)
    decoded = decode_full(payload, weights_fingerprint(tensors))
    assert all(torch.equal(decoded[name], t) for name, t in tensors.items())
    assert encode_full({}) == save({})


def test_malloc_setting_is_glibcs_and_may_be_repeated():
    import platform

    expected = platform.libc_ver()[0] == "glibc"
    assert return_freed_tensors() is expected
    assert return_freed_tensors() is expected


def test_demo_step_clears_the_gradients_and_sends_the_same_step():
    from swarmrl.protocol.codecs import decoupled_momentum as demo
    from swarmrl.trainer.optimizers import DemoOptimizer

    torch.manual_seed(0)
    weights = {"a.weight": torch.randn(70, 130), "b.bias": torch.randn(9)}
    grads = {name: torch.randn_like(t) for name, t in weights.items()}
    settings = demo.DemoSettings(topk=2, chunk=64, value_bits=16)
    parameters = [(n, torch.nn.Parameter(t.clone())) for n, t in weights.items()]
    optimizer = DemoOptimizer(parameters, lr=1e-3, weight_decay=0.1, decay=0.9, settings=settings)
    for name, parameter in parameters:
        parameter.grad = grads[name].clone()
    optimizer.step()
    assert all(parameter.grad is None for _, parameter in parameters)
    # The step by hand: momentum, its selection, the payload, replayed.
    selections = {name: demo.select(1e-3 * grads[name], settings) for name in weights}
    shapes = {name: tuple(t.shape) for name, t in weights.items()}
    payload = demo.encode(selections, shapes, settings, 1e-3, 0.1)
    assert optimizer.last_payload == payload
    demo.apply_update(payload, weights)
    assert all(torch.equal(p.detach(), weights[n]) for n, p in parameters)
