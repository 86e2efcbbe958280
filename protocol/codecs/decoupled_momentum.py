"""The `demo` codec (DeMo, decoupled momentum): a compressed optimizer step workers replay exactly.

DeMo (Peng, Quesnelle, Kingma 2024) keeps only the largest DCT coefficients of the momentum
and moves every weight by `lr * sign(decoded)`. Here that step is the wire format, and both
the trainer and every worker apply it through `apply_update`, so they hold the same weights.

Each tensor is viewed as a matrix (1-D ones as one row), cut into blocks of up to
chunk x chunk, and every block sends its `topk` coefficients: a position in the block
(12 bits for 64 x 64) and a value (1 bit: only the sign; or 16: a bf16 value). The codes are
bit-packed back to back, in sorted-name order, after a 38-byte header (format, settings,
lr, weight decay, a hash of the tensor layout, the block count). Nothing else is sent:
the worker knows the names and shapes from its own copy of the model.

Replay is exact by construction. The direction is the sign of the decoded block, computed in
float64 and snapped to a 2^-30 grid so a coefficient sum that is zero in exact arithmetic
(or a DCT basis value that is zero, for odd block sizes) gives 0 on every machine; with
`topk = 1` the sign is the product of three signs, no sum at all. The weight update then is
`p *= 1 - lr * weight_decay` and `p -= lr * direction` with direction in {-1, 0, 1}: two
correctly rounded IEEE operations, the same bits on any CPU or GPU.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from swarmrl.protocol.codecs.interface import PayloadError, Tensors, WeightCodec, layout_hash

if TYPE_CHECKING:
    import torch

MAGIC = b"SRDM"
FORMAT = 1
# magic, format, value_bits, chunk, topk, lr, weight decay, layout hash, block count
HEADER = struct.Struct("<4sBBHHdd8sI")
SNAP = 2.0**30  # decoded values are rounded to this grid before taking the sign


@dataclass(frozen=True)
class DemoSettings:
    topk: int = 1
    chunk: int = 64
    value_bits: int = 1  # 1: sign only; 16: bf16 value


@dataclass(frozen=True)
class Selection:
    """One tensor's kept coefficients: `positions[b, j]` in block b, `values` in full precision."""

    positions: torch.Tensor  # (blocks, k) int64
    values: torch.Tensor  # (blocks, k) float32


# ---- geometry ----------------------------------------------------------------------------


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def block_shape(shape: tuple[int, ...], chunk: int) -> tuple[int, int]:
    rows, cols = matrix_shape(shape)
    return min(chunk, rows), min(chunk, cols)


def block_count(shape: tuple[int, ...], chunk: int) -> int:
    (rows, cols), (bh, bw) = matrix_shape(shape), block_shape(shape, chunk)
    return math.ceil(rows / bh) * math.ceil(cols / bw)


def position_bits(chunk: int) -> int:
    return max(1, math.ceil(math.log2(chunk * chunk)))


def to_blocks(matrix: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """(rows, cols) -> (blocks, bh, bw), zero-padded at the bottom and right, row-major blocks."""
    import torch

    rows, cols = matrix.shape
    padded = torch.nn.functional.pad(matrix, (0, -cols % bw, 0, -rows % bh))
    r, c = padded.shape[0] // bh, padded.shape[1] // bw
    return padded.reshape(r, bh, c, bw).permute(0, 2, 1, 3).reshape(r * c, bh, bw)


def from_blocks(blocks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    _, bh, bw = blocks.shape
    r, c = math.ceil(rows / bh), math.ceil(cols / bw)
    matrix = blocks.reshape(r, c, bh, bw).permute(0, 2, 1, 3).reshape(r * bh, c * bw)
    return matrix[:rows, :cols]


@functools.cache
def dct_basis(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix in float64: row k is frequency k, so coefficients = B @ x."""
    import torch

    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    basis[0] /= math.sqrt(2)
    return basis


@functools.cache
def basis_signs(n: int) -> torch.Tensor:
    import torch

    return torch.sign(torch.round(dct_basis(n) * SNAP))


# ---- trainer side: choose what to send ---------------------------------------------------


def select(momentum: torch.Tensor, settings: DemoSettings) -> Selection:
    """The `topk` largest DCT coefficients of every block of `momentum`."""
    shape = tuple(momentum.shape)
    bh, bw = block_shape(shape, settings.chunk)
    blocks = to_blocks(momentum.detach().float().reshape(matrix_shape(shape)), bh, bw)
    h, w = dct_basis(bh).float(), dct_basis(bw).float()
    coefficients = (h @ blocks @ w.T).reshape(len(blocks), bh * bw)
    k = min(settings.topk, bh * bw)
    positions = coefficients.abs().topk(k, dim=1, sorted=False).indices
    positions = positions.sort(dim=1).values  # canonical order: the payload is deterministic
    return Selection(positions, coefficients.gather(1, positions))


def dense(selection: Selection, shape: tuple[int, ...], chunk: int) -> torch.Tensor:
    """The tensor the selected coefficients stand for, in float32 (error feedback: m -= this).

    A coefficient v at frequency (i, j) stands for v * outer(h[i], w[j]), so a block with k
    coefficients is a product of (bh x k) and (k x bw) matrices: for the usual small k, far
    cheaper than scattering them into a full block and inverting its DCT."""
    import torch

    rows, cols = matrix_shape(shape)
    bh, bw = block_shape(shape, chunk)
    h, w = dct_basis(bh).float(), dct_basis(bw).float()
    values = selection.values.float()
    if selection.positions.shape[1] < bh + bw:
        left = h[selection.positions // bw] * values[..., None]  # (blocks, k, bh)
        blocks = left.transpose(1, 2) @ w[selection.positions % bw]  # (blocks, bh, bw)
    else:
        coefficients = torch.zeros(len(selection.positions), bh * bw)
        coefficients.scatter_(1, selection.positions, values)
        blocks = h.T @ coefficients.reshape(-1, bh, bw) @ w
    return from_blocks(blocks, rows, cols).reshape(shape)


def encode(
    selections: Mapping[str, Selection],
    shapes: Mapping[str, tuple[int, ...]],
    settings: DemoSettings,
    lr: float,
    weight_decay: float,
) -> bytes:
    """Header + bit-packed (position, value) codes of every tensor, in sorted-name order."""
    import torch

    value_bits, width = settings.value_bits, position_bits(settings.chunk) + settings.value_bits
    codes = []
    for name in sorted(shapes):
        selection = selections[name]
        if value_bits == 1:
            values = (selection.values < 0).long()
        else:
            values = selection.values.to(torch.bfloat16).view(torch.int16).long() & 0xFFFF
        codes.append(((selection.positions << value_bits) | values).reshape(-1))
    flat = torch.cat(codes).numpy().astype(np.uint64)
    blocks = sum(block_count(shapes[name], settings.chunk) for name in shapes)
    header = HEADER.pack(
        MAGIC,
        FORMAT,
        value_bits,
        settings.chunk,
        settings.topk,
        lr,
        weight_decay,
        layout_hash(shapes),
        blocks,
    )
    return header + pack_codes(flat, width)


def pack_codes(codes: np.ndarray, width: int) -> bytes:
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((codes[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_codes(body: bytes | memoryview, count: int, width: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8), count=count * width)
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    return (bits.reshape(count, width).astype(np.uint64) << shifts).sum(axis=1, dtype=np.uint64)


# ---- both sides: read and apply -----------------------------------------------------------


@dataclass(frozen=True)
class Update:
    settings: DemoSettings
    lr: float
    weight_decay: float
    selections: dict[str, Selection]  # values as sent: +-1 for 1-bit, bf16 for 16-bit


def decode(payload: bytes | memoryview, shapes: Mapping[str, tuple[int, ...]]) -> Update:
    """Parse and check a payload against the receiver's tensor shapes; PayloadError if bad."""
    import torch

    if len(payload) < HEADER.size:
        raise PayloadError(f"demo payload too short: {len(payload)} bytes")
    magic, version, value_bits, chunk, topk, lr, wd, layout, blocks = HEADER.unpack_from(payload)
    if magic != MAGIC or version != FORMAT:
        raise PayloadError(f"not a demo payload of format {FORMAT} (magic {magic!r}, {version})")
    if value_bits not in (1, 16) or not 1 <= chunk <= 256 or not 1 <= topk <= chunk * chunk:
        raise PayloadError(f"bad demo settings: value_bits {value_bits} chunk {chunk} topk {topk}")
    if not (math.isfinite(lr) and 0 <= lr <= 1 and math.isfinite(wd) and 0 <= wd <= 1e3):
        raise PayloadError(f"bad demo step: lr {lr} weight decay {wd}")
    if layout != layout_hash(shapes):
        raise PayloadError("demo payload is for another model layout (names or shapes differ)")
    expected_blocks = sum(block_count(shapes[name], chunk) for name in shapes)
    if blocks != expected_blocks:
        raise PayloadError(f"demo payload has {blocks} blocks, this model {expected_blocks}")
    width = position_bits(chunk) + value_bits
    ks = {name: min(topk, math.prod(block_shape(shapes[name], chunk))) for name in shapes}
    count = sum(block_count(shapes[name], chunk) * ks[name] for name in shapes)
    body = memoryview(payload)[HEADER.size :]
    if len(body) != math.ceil(count * width / 8):
        raise PayloadError(
            f"demo payload body is {len(body)} bytes, expected {math.ceil(count * width / 8)} "
            "(truncated or padded)"
        )
    codes = torch.from_numpy(unpack_codes(body, count, width).astype(np.int64))
    selections, start = {}, 0
    for name in sorted(shapes):
        n, k = block_count(shapes[name], chunk), ks[name]
        part = codes[start : start + n * k].reshape(n, k)
        start += n * k
        positions, raw = part >> value_bits, part & ((1 << value_bits) - 1)
        if int(positions.max()) >= math.prod(block_shape(shapes[name], chunk)):
            raise PayloadError(f"demo payload: a position outside the block in {name}")
        if value_bits == 1:
            values = 1.0 - 2.0 * raw.float()
        else:
            values = raw.to(torch.int32).to(torch.int16).view(torch.bfloat16).float()
            if not bool(torch.isfinite(values).all()):
                raise PayloadError(f"demo payload: a non-finite value in {name}")
        selections[name] = Selection(positions, values)
    settings = DemoSettings(topk=topk, chunk=chunk, value_bits=value_bits)
    return Update(settings, lr, wd, selections)


def direction(selection: Selection, shape: tuple[int, ...], chunk: int) -> torch.Tensor:
    """sign(decoded block) in {-1, 0, 1} as float32, identical on every machine (see top)."""
    import torch

    rows, cols = matrix_shape(shape)
    bh, bw = block_shape(shape, chunk)
    row_freq, col_freq = selection.positions // bw, selection.positions % bw
    if selection.positions.shape[1] == 1:
        sign = torch.sign(selection.values[:, 0]).float()[:, None, None]
        rows_sign = basis_signs(bh).float()[row_freq[:, 0]][:, :, None]
        blocks = sign * rows_sign * basis_signs(bw).float()[col_freq[:, 0]][:, None, :]
    else:
        weighted = dct_basis(bh)[row_freq] * selection.values.double()[..., None]
        total = torch.einsum("nki,nkj->nij", weighted, dct_basis(bw)[col_freq])
        scale = selection.values.abs().amax(dim=1).double().clamp_min(1e-30)[:, None, None]
        blocks = torch.sign(torch.round(total / scale * SNAP)).float()
    return from_blocks(blocks, rows, cols).reshape(shape)


def apply_update(payload: bytes | memoryview, tensors: Mapping[str, torch.Tensor]) -> Update:
    """Replay one payload on `tensors` in place. Everything is checked before any is touched."""
    import torch

    update = decode(payload, {name: tuple(t.shape) for name, t in tensors.items()})
    chunk = update.settings.chunk
    with torch.no_grad():
        for name in sorted(tensors):
            tensor = tensors[name]
            step = direction(update.selections[name], tuple(tensor.shape), chunk)
            if update.weight_decay:
                tensor.mul_(1 - update.lr * update.weight_decay)
            tensor.add_(step.to(device=tensor.device, dtype=tensor.dtype), alpha=-update.lr)
    return update


class DecoupledMomentum(WeightCodec):
    """The demo optimizer's own step (trainer/optimizers.py): its payload is the message."""

    name = "demo"
    optimizer = "demo"

    def check(self, trainer: Any) -> None:
        chunk, topk = trainer.demo.chunk, trainer.demo.topk
        if topk > chunk * chunk:
            raise ValueError(f"trainer.demo.topk {topk} exceeds a {chunk}x{chunk} block")

    def encode(self, previous: Tensors | None, current: Tensors, optimizer: Any) -> bytes:
        payload = getattr(optimizer, "last_payload", None)
        if payload is None:
            raise RuntimeError("the demo codec publishes the demo optimizer's step: none yet")
        return payload

    def apply(self, payload: bytes | memoryview, tensors: Tensors) -> None:
        apply_update(payload, tensors)
