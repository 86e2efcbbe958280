"""Protocol v1: schema round trips, hostile input to decode, and real ZeroMQ on loopback."""

import contextlib
import math
import time

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmrl.protocol.framing import ProtocolError, decode, encode
from swarmrl.protocol.messages import (
    MAX_PROMPTS_PER_LEASE,
    MAX_TEXT_CHARS,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Accept,
    Bye,
    Completion,
    GroupResult,
    Heartbeat,
    Hello,
    Lease,
    LeasePrompt,
    NoWork,
    Reject,
    RunSpec,
    SamplingParams,
    Submission,
    WeightUpdate,
    WorkRequest,
)
from swarmrl.protocol.transport import (
    Channel,
    bound_endpoint,
    make_dealer,
    make_router,
    recv_from,
    send_to,
)

SAMPLING = SamplingParams(temperature=0.7, top_p=1.0, top_k=0, max_tokens=256, stop=["</answer>"])
COMPLETION = Completion(
    token_ids=[5, 17, 2],
    logprobs=[-0.1, -1e-300, -2.220446049250313e-16],
    text="42</answer>",
    finish_reason="stop",
)
SUBMISSION = Submission(
    lease_id="lease-1",
    policy_version=3,
    groups=[GroupResult(prompt_id="p-0", completions=[COMPLETION, COMPLETION])],
    generation_seconds=1.2345678901234567,
)
MESSAGES = [
    Hello(worker_name="gpu-box", backend="vllm", software_version="0.1.0", max_prompts_per_lease=8),
    RunSpec(
        run_id="run-1",
        worker_id="worker-3",
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        dtype="float32",
        sampling=SAMPLING,
        num_generations=8,
        heartbeat_interval_s=5.0,
        heartbeat_timeout_s=30.0,
        weights_version=0,
    ),
    WorkRequest(max_prompts=4, weights_version=-1),
    Lease(
        lease_id="lease-1",
        policy_version=3,
        num_generations=2,
        prompts=[LeasePrompt(prompt_id="p-0", token_ids=[1, 2, 3], seed=2**64 - 1)],
        deadline_s=0.1,
    ),
    NoWork(reason="buffer full", retry_after_s=0.5),
    SUBMISSION,
    Accept(lease_id="lease-1"),
    Reject(lease_id=None, reason="malformed", detail="frame 0 is not valid msgpack"),
    WeightUpdate(version=4, codec="demo-topk", fingerprint="ab12", num_bytes=0, base_version=3),
    Heartbeat(sent_at=1718000000.123456789, weights_version=4),
    Bye(reason="shutting down"),
]


def _pack(data: dict) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


def _hello(drop: str = "", **overrides: object) -> list[bytes]:
    """Frames of a Hello with some fields replaced or one dropped."""
    data = {"v": PROTOCOL_VERSION, **MESSAGES[0].model_dump(), **overrides}
    data.pop(drop, None)
    return [_pack(data)]


def _reason(frames: list) -> str:
    with pytest.raises(ProtocolError) as caught:
        decode(frames)
    return caught.value.reason


def test_messages_cover_every_type() -> None:
    assert sorted(m.type for m in MESSAGES) == sorted(MESSAGE_TYPES)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.type)
def test_round_trip(message) -> None:
    decoded, blobs = decode(encode(message))
    assert decoded == message
    assert type(decoded) is type(message)
    assert blobs == []


def test_floats_round_trip_exactly() -> None:
    decoded, _ = decode(encode(SUBMISSION))
    assert decoded.generation_seconds == 1.2345678901234567
    assert decoded.groups[0].completions[0].logprobs == COMPLETION.logprobs


def test_blob_passes_through_unchanged() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    update = WeightUpdate(version=1, codec="raw", fingerprint="f", num_bytes=len(payload))
    frames = encode(update, [payload])
    assert frames[1] is payload
    decoded, blobs = decode(frames)
    assert decoded == update
    assert len(blobs) == 1 and blobs[0] == payload


def test_weight_update_size_must_match_its_blob() -> None:
    update = WeightUpdate(version=1, codec="raw", fingerprint="f", num_bytes=10)
    header = _pack({"v": PROTOCOL_VERSION, **update.model_dump()})
    assert _reason([header, b"x" * 9]) == "invalid"
    with pytest.raises(ProtocolError):
        encode(update, [b"x" * 9])
    assert _reason([encode(Bye(reason="x"))[0], b"blob"]) == "invalid"


def test_encode_refuses_nested_models() -> None:
    with pytest.raises(TypeError):
        encode(SAMPLING)


def _completion(**overrides: object) -> dict:
    return {**COMPLETION.model_dump(), **overrides}


def _submission(completion: dict) -> bytes:
    data = SUBMISSION.model_dump()
    data["groups"][0]["completions"] = [completion]
    return _pack({"v": PROTOCOL_VERSION, **data})


BAD_FRAMES = {
    "no frames": ([], "malformed"),
    "random bytes": ([b"\xc1\xff\x00garbage"], "malformed"),
    "truncated msgpack": ([encode(SUBMISSION)[0][:-5]], "malformed"),
    "trailing bytes": ([encode(SUBMISSION)[0] + b"\x00"], "malformed"),
    "list not map": ([msgpack.packb([1, "hello"])], "malformed"),
    "int keys": ([msgpack.packb({1: 2})], "malformed"),
    "bin field": (_hello(worker_name=b"bytes"), "malformed"),
    "ext type": (_hello(worker_name=msgpack.ExtType(42, b"abc")), "malformed"),
    "zero length ext": (
        _hello(worker_name=msgpack.ExtType(1, b"")),
        "malformed",
    ),
    "timestamp ext": (_hello(sent_at=msgpack.Timestamp(1)), "malformed"),
    "huge array header": ([b"\xdd\xff\xff\xff\xff\x01"], "malformed"),
    "huge map header": ([b"\xdf\xff\xff\xff\xff\x01"], "malformed"),
    "huge str header": ([b"\xdb\x7f\xff\xff\xff" + b"a" * 8], "malformed"),
    "over-long str": (_hello(worker_name="\u00e9" * (2 * MAX_TEXT_CHARS + 1)), "malformed"),
    "deep nesting": ([b"\x91" * 100_000 + b"\x00"], "malformed"),
    "no version": (_hello(drop="v"), "bad_version"),
    "wrong version": (_hello(v=1), "bad_version"),
    "bool version": (_hello(v=True), "bad_version"),
    "unknown type": (_hello(type="gimme_weights"), "unknown_type"),
    "no type": (_hello(drop="type"), "unknown_type"),
    "missing field": (_hello(drop="backend"), "invalid"),
    "extra field": (_hello(admin=True), "invalid"),
    "wrong field type": (_hello(max_prompts_per_lease="8"), "invalid"),
    "float for int": (_hello(max_prompts_per_lease=8.0), "invalid"),
    "name too long": (_hello(worker_name="w" * 129), "invalid"),
    "logprobs length": ([_submission(_completion(logprobs=[-0.1, -0.2]))], "invalid"),
    "positive logprob": ([_submission(_completion(logprobs=[-0.1, 0.5, -0.1]))], "invalid"),
    "nan logprob": ([_submission(_completion(logprobs=[-0.1, math.nan, -0.1]))], "invalid"),
    "-inf logprob": ([_submission(_completion(logprobs=[-0.1, -math.inf, -0.1]))], "invalid"),
    "negative token": ([_submission(_completion(token_ids=[5, -1, 2]))], "invalid"),
    "too many prompts": (
        [
            _pack(
                {
                    "v": PROTOCOL_VERSION,
                    **MESSAGES[3].model_dump(),
                    "prompts": [MESSAGES[3].prompts[0].model_dump()] * (MAX_PROMPTS_PER_LEASE + 1),
                }
            )
        ],
        "invalid",
    ),
    "too many blob frames": ([encode(MESSAGES[8])[0], b"a", b"b"], "too_many_frames"),
}


@pytest.mark.parametrize("case", BAD_FRAMES)
def test_bad_frames_raise_protocol_error(case: str) -> None:
    frames, reason = BAD_FRAMES[case]
    assert _reason(frames) == reason


def test_error_message_is_short_and_specific() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(_hello(v=7))
    assert "expected" in str(caught.value) and "7" in str(caught.value)
    with pytest.raises(ProtocolError) as caught:
        decode(_hello(type="x" * 10_000))
    assert "hello" in str(caught.value) and len(str(caught.value)) < 300
    logprobs = [0.5] * 1000
    with pytest.raises(ProtocolError) as caught:
        decode([_submission(_completion(token_ids=[1] * 1000, logprobs=logprobs))])
    assert "groups.0.completions.0.logprobs.0" in str(caught.value)
    assert "more" in str(caught.value) and len(str(caught.value)) < 500


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash_decode(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode([data])


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.sampled_from([*MESSAGE_TYPES, "nope"]),
    st.dictionaries(
        st.sampled_from(["v", "lease_id", "reason", "groups", "prompts", "seed", "sent_at"])
        | st.text(max_size=10),
        MSGPACK_VALUES,
        max_size=8,
    ),
)
def test_arbitrary_maps_never_crash_decode(kind: str, fields: dict) -> None:
    with contextlib.suppress(ProtocolError):
        decode([_pack({"v": PROTOCOL_VERSION, "type": kind, **fields})])


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_zmq_hello_run_spec_round_trip(context: zmq.Context) -> None:
    router = make_router(context, "tcp://127.0.0.1:0", max_message_bytes=1 << 20)
    endpoint = bound_endpoint(router)
    assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":0")
    channel = Channel(make_dealer(context, endpoint, b"w-1", max_message_bytes=1 << 24))

    channel.send(MESSAGES[0])
    identity, frames = recv_from(router, timeout_s=5)
    message, _ = decode(frames)
    assert identity == b"w-1" and message == MESSAGES[0]

    payload = b"\x07" * 100_000
    update = WeightUpdate(version=0, codec="raw", fingerprint="f", num_bytes=len(payload))
    send_to(router, identity, MESSAGES[1])
    send_to(router, identity, update, [memoryview(payload)])
    assert channel.recv(timeout_s=5) == (MESSAGES[1], [])
    received, blobs = channel.recv(timeout_s=5)
    assert received == update and blobs == [payload]
    assert channel.recv(timeout_s=0.05) is None
    assert recv_from(router, timeout_s=0.05) is None
    channel.close()


def test_zmq_channel_raises_on_malformed_frame(context: zmq.Context) -> None:
    router = make_router(context, "tcp://127.0.0.1:0", max_message_bytes=1 << 20)
    channel = Channel(make_dealer(context, bound_endpoint(router), b"w-1", 1 << 20))
    channel.send(Bye(reason="hi"))
    identity, _ = recv_from(router, timeout_s=5)
    router.send_multipart([identity, b"not msgpack"])
    send_to(router, identity, Bye(reason="still here"))
    with pytest.raises(ProtocolError):
        channel.recv(timeout_s=5)
    assert channel.recv(timeout_s=5) == (Bye(reason="still here"), [])


def test_zmq_oversized_frame_is_dropped_and_router_keeps_serving(context: zmq.Context) -> None:
    router = make_router(context, "tcp://127.0.0.1:0", max_message_bytes=10_000)
    endpoint = bound_endpoint(router)
    attacker = make_dealer(context, endpoint, b"attacker", 1 << 20)
    attacker.send(b"x" * 20_000)  # ZeroMQ drops the connection mid-frame
    assert recv_from(router, timeout_s=0.3) is None

    channel = Channel(make_dealer(context, endpoint, b"honest", 1 << 20))
    channel.send(Heartbeat(sent_at=time.time()))
    identity, frames = recv_from(router, timeout_s=5)
    assert identity == b"honest" and decode(frames)[0].type == "heartbeat"


def test_zmq_reconnect_with_same_identity_takes_over(context: zmq.Context) -> None:
    router = make_router(context, "tcp://127.0.0.1:0", max_message_bytes=1 << 20)
    endpoint = bound_endpoint(router)
    old = Channel(make_dealer(context, endpoint, b"w-1", 1 << 20))
    old.send(Bye(reason="old"))
    assert recv_from(router, timeout_s=5)[0] == b"w-1"
    new = Channel(make_dealer(context, endpoint, b"w-1", 1 << 20))
    new.send(Bye(reason="new"))
    assert recv_from(router, timeout_s=5)[0] == b"w-1"

    send_to(router, b"w-1", Bye(reason="to w-1"))
    assert new.recv(timeout_s=5) == (Bye(reason="to w-1"), [])
    assert old.recv(timeout_s=0.2) is None


def test_dealer_send_times_out_without_trainer(context: zmq.Context) -> None:
    channel = Channel(make_dealer(context, "tcp://127.0.0.1:9", b"w-1", 1 << 20))
    with pytest.raises(TimeoutError):
        channel.send(Bye(reason="anyone?"), timeout_s=0.1)


def test_dealer_identity_is_checked(context: zmq.Context) -> None:
    for identity in (b"", b"\x00abc", b"x" * 256):
        with pytest.raises(ValueError):
            make_dealer(context, "tcp://127.0.0.1:9", identity, 1 << 20)
