"""Bytes on the wire: one message = one ZeroMQ multipart message.

Frame 0 is a msgpack map {"v": PROTOCOL_VERSION, "type": ..., **fields}; frames 1..n are raw
binary blobs (weight payloads) passed through untouched, never copied or parsed here. Only
WeightUpdate carries blobs, and their total length must equal its num_bytes.

decode() is the trust boundary for anything a peer sent: it either returns a validated message
or raises ProtocolError, with a short `reason` code the trainer can echo in a Reject. msgpack
is unpacked with every length bounded and ext types refused; nothing is ever unpickled.
"""

from collections.abc import Sequence

import msgpack
import pydantic
import zmq
from pydantic import BaseModel

from swarmrl.protocol.messages import (
    MAX_TEXT_CHARS,
    MAX_TOKENS_PER_SEQUENCE,
    MESSAGE_ADAPTER,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Message,
    WeightUpdate,
)
from swarmrl.protocol.refusals import Refused

# Bounds for unpacking frame 0; each is checked before anything is allocated.
_UNPACK_LIMITS = {
    "max_str_len": 4 * MAX_TEXT_CHARS,  # bytes: a UTF-8 character takes up to 4
    "max_bin_len": 0,  # no bytes fields in frame 0: binary data travels as blob frames
    "max_array_len": MAX_TOKENS_PER_SEQUENCE,  # the longest list is a token/logprob list
    "max_map_len": 32,  # the widest message has a dozen fields
    "max_ext_len": 0,  # ext types (timestamps, anything custom) are refused
}
_MAX_ERRORS_SHOWN = 3


class ProtocolError(Refused, ValueError):
    """A peer sent something that is not a valid protocol message.

    reason: "malformed" (not a msgpack map), "bad_version", "unknown_type", "invalid" (fails
    the schema), or "too_many_frames".
    """


def encode(
    message: BaseModel, blobs: Sequence[bytes | memoryview] = ()
) -> list[bytes | memoryview]:
    """Frames for `message`, ready for send_multipart. Blobs are passed through, not copied."""
    if getattr(message, "type", None) not in MESSAGE_TYPES:
        raise TypeError(f"{type(message).__name__} is not a top-level protocol message")
    _check_blobs(message, blobs)
    header = msgpack.packb({"v": PROTOCOL_VERSION, **message.model_dump()}, use_bin_type=True)
    return [header, *blobs]


def decode(
    frames: Sequence[bytes | zmq.Frame | memoryview], max_blobs: int = 1
) -> tuple[Message, list[memoryview]]:
    """Validate the frames a peer sent: (message, blob buffers) or ProtocolError."""
    if not frames:
        raise ProtocolError("malformed", "empty message: no frames")
    if len(frames) - 1 > max_blobs:
        raise ProtocolError(
            "too_many_frames", f"{len(frames) - 1} blob frames, at most {max_blobs} allowed"
        )
    buffers = [
        frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame) for frame in frames
    ]
    data = _unpack(buffers[0])
    version = data.pop("v", None)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad_version",
            f"protocol version {PROTOCOL_VERSION} expected, received {_short(version)}",
        )
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise ProtocolError(
            "unknown_type",
            f"unknown message type {_short(kind)}; known: {', '.join(MESSAGE_TYPES)}",
        )
    try:
        message = MESSAGE_ADAPTER.validate_python(data)
    except pydantic.ValidationError as error:
        raise ProtocolError("invalid", f"invalid {kind}: {_summarize(error)}") from None
    blobs = buffers[1:]
    _check_blobs(message, blobs)
    return message, blobs


def _unpack(buffer: memoryview) -> dict:
    try:
        data = msgpack.unpackb(
            buffer, raw=False, strict_map_key=True, ext_hook=_refuse_ext, **_UNPACK_LIMITS
        )
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        detail = str(error) or type(error).__name__
        raise ProtocolError("malformed", f"frame 0 is not valid msgpack: {detail}") from None
    if not isinstance(data, dict):
        raise ProtocolError("malformed", f"frame 0 is a msgpack {type(data).__name__}, not a map")
    return data


def _refuse_ext(code: int, data: bytes) -> None:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def _check_blobs(message: BaseModel, blobs: Sequence[bytes | memoryview]) -> None:
    total = sum(memoryview(blob).nbytes for blob in blobs)
    if isinstance(message, WeightUpdate):
        if total != message.num_bytes:
            raise ProtocolError(
                "invalid", f"weight_update declares {message.num_bytes} bytes, carries {total}"
            )
    elif blobs:
        raise ProtocolError("invalid", f"{message.type} carries no blob frames, got {len(blobs)}")


def _summarize(error: pydantic.ValidationError) -> str:
    details = error.errors(include_url=False, include_input=False, include_context=False)
    shown = [
        f"{'.'.join(str(part) for part in detail['loc'][1:]) or '<root>'}: {detail['msg']}"
        for detail in details[:_MAX_ERRORS_SHOWN]
    ]
    more = len(details) - len(shown)
    return "; ".join(shown) + (f" (+{more} more)" if more else "")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
