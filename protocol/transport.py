"""ZeroMQ sockets: the trainer's ROUTER, a worker's DEALER, and send/receive helpers.

The trainer binds one ROUTER and serves it from a single network thread with recv_from /
send_to; it decodes frames itself so that it can answer a bad message with a Reject. A worker
connects one DEALER and talks through a Channel. Nothing here starts threads, except the ZAP
handler of a closed swarm's ROUTER.

Liveness has two layers: ZMTP heartbeats (below) let libzmq drop dead TCP connections and
the DEALER reconnect on its own; the protocol's Heartbeat messages tell the trainer a worker
is alive and working. ZMTP heartbeats only count complete messages as traffic, so
HEARTBEAT_TIMEOUT_MS must exceed the time to transfer the largest message (a keyframe on
a slow link), or the connection is dropped mid-transfer.

A closed swarm (auth.py) adds CURVE: the ROUTER is a CurveZMQ server whose ZAP handler lets
in only allowlisted worker keys, and each DEALER pins the trainer's public key.
"""

from collections.abc import Sequence

import zmq
from pydantic import BaseModel

from swarmrl.protocol.auth import (
    ZAP_DOMAIN,
    AuthenticatedRouter,
    CurveClient,
    CurveServer,
    load_curve_server,
    start_authenticator,
)
from swarmrl.protocol.framing import decode, encode
from swarmrl.protocol.messages import Message

HWM_MESSAGES = 1000
HEARTBEAT_IVL_MS = 5_000
HEARTBEAT_TIMEOUT_MS = 120_000
RECONNECT_IVL_MS = 200
RECONNECT_IVL_MAX_MS = 5_000


def make_router(
    context: zmq.Context,
    endpoint: str,
    max_message_bytes: int,
    allow_keys: str | None = None,
    trainer_key: str | None = None,
) -> zmq.Socket:
    """The trainer's socket, bound to `endpoint` ("tcp://host:0" picks a free port).

    `allow_keys` (a file of worker public keys) closes the swarm: CURVE with the key pair in
    the secret key file `trainer_key`, and only listed workers get through. Raises
    auth.KeyFileError for a missing or malformed key file.
    """
    if allow_keys is None:
        socket = context.socket(zmq.ROUTER)
    else:
        socket = _curve_router(context, load_curve_server(allow_keys, trainer_key))
    # A worker that reconnects with the same identity takes over its old, dead connection.
    socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
    # Inbound cap per frame: a bigger frame drops that connection before it is buffered.
    socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    _set_common(socket)
    socket.bind(endpoint)  # libzmq resolves port 0 to a free port; see bound_endpoint
    return socket


def make_dealer(
    context: zmq.Context,
    endpoint: str,
    identity: bytes,
    max_message_bytes: int,
    curve: CurveClient | None = None,
) -> zmq.Socket:
    """A worker's socket, connected to the trainer; reconnects on its own.

    identity: 1..255 bytes, not starting with a zero byte (libzmq reserves those). Use an
    unguessable one (os.urandom): the trainer's ROUTER hands an identity over to whoever
    connects with it last. `curve`: the worker's keys for a closed swarm.
    """
    if not 1 <= len(identity) <= 255 or identity[0] == 0:
        raise ValueError("identity must be 1..255 bytes and must not start with a zero byte")
    socket = context.socket(zmq.DEALER)
    # The trainer routes replies by this identity, across reconnects.
    socket.setsockopt(zmq.IDENTITY, identity)
    # Inbound cap per frame; must fit a full-weights keyframe.
    socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    # Back off from 200 ms up to 5 s between attempts while the trainer is away.
    socket.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    # Queue outbound messages only on a live connection: while disconnected, send waits
    # (Channel.send times out) instead of piling up stale requests.
    socket.setsockopt(zmq.IMMEDIATE, 1)
    if curve is not None:
        # CurveZMQ client: the handshake fails unless the peer holds the secret key of
        # trainer_public, and the trainer's ZAP handler accepts this worker's public key.
        # A refused handshake delivers nothing: sends time out (IMMEDIATE, above).
        socket.setsockopt(zmq.CURVE_SERVERKEY, curve.trainer_public)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, curve.keys.public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, curve.keys.secret)
    _set_common(socket)
    socket.connect(endpoint)
    return socket


def _curve_router(context: zmq.Context, server: CurveServer) -> zmq.Socket:
    socket = context.socket(zmq.ROUTER, socket_class=AuthenticatedRouter)
    # libzmq lets every CURVE key in while no ZAP handler listens, so the handler starts
    # before the bind and stops only when this socket closes.
    socket.authenticator = start_authenticator(context, server)
    # CurveZMQ server: every connection is encrypted and authenticated; plain (NULL) peers
    # fail the handshake and never reach recv.
    socket.setsockopt(zmq.CURVE_SERVER, 1)
    # The trainer's long-term key pair; workers pin its public key (--trainer-key).
    socket.setsockopt(zmq.CURVE_SECRETKEY, server.keys.secret)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, server.keys.public)
    # Ask the ZAP handler about each client key in this domain; a refusal (status 400)
    # closes the connection before any message is delivered.
    socket.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    return socket


def _set_common(socket: zmq.Socket) -> None:
    # Bound the per-peer queues (in messages) so a stalled peer cannot grow them forever.
    socket.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
    socket.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
    # close() discards unsent messages at once instead of blocking shutdown.
    socket.setsockopt(zmq.LINGER, 0)
    # ZMTP PING every interval; drop the connection when nothing arrives within the timeout.
    socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    # Tells the peer to drop us too if our PINGs stop (covers a one-sided hang).
    socket.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    # OS keepalive probes keep NAT/firewall state alive on idle connections.
    socket.setsockopt(zmq.TCP_KEEPALIVE, 1)


def bound_endpoint(socket: zmq.Socket) -> str:
    """The endpoint actually bound, e.g. "tcp://127.0.0.1:43817" after binding port 0."""
    return socket.getsockopt(zmq.LAST_ENDPOINT).decode()


class Channel:
    """A worker's conversation with the trainer over one DEALER socket."""

    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket

    def send(
        self, message: BaseModel, blobs: Sequence[bytes | memoryview] = (), timeout_s: float = 30.0
    ) -> None:
        """Send one message; TimeoutError if it cannot be queued within timeout_s (no
        connection to the trainer, or SNDHWM messages already waiting)."""
        if not self.socket.poll(int(timeout_s * 1000), zmq.POLLOUT):
            raise TimeoutError(f"trainer not reachable for {timeout_s} s")
        self.socket.send_multipart(encode(message, blobs), copy=False)

    def recv(self, timeout_s: float) -> tuple[Message, list[memoryview]] | None:
        """The next message and its blob buffers, or None after timeout_s.

        Raises ProtocolError for a malformed message (it has been consumed; keep going).
        """
        if not self.socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        return decode(self.socket.recv_multipart(copy=False))

    def close(self, linger_s: float = 0.0) -> None:
        """Close; `linger_s` gives queued messages (a last submission, a bye) time to leave."""
        self.socket.close(linger=int(linger_s * 1000))


def recv_from(router: zmq.Socket, timeout_s: float) -> tuple[bytes, list[zmq.Frame]] | None:
    """(peer identity, raw frames) of the next message, or None after timeout_s.

    Frames are not copied; pass them to framing.decode and answer a ProtocolError with Reject.
    """
    if not router.poll(int(timeout_s * 1000), zmq.POLLIN):
        return None
    identity, *frames = router.recv_multipart(copy=False)
    return identity.bytes, frames


def send_to(
    router: zmq.Socket,
    identity: bytes,
    message: BaseModel,
    blobs: Sequence[bytes | memoryview] = (),
    track: bool = False,
) -> zmq.MessageTracker | None:
    """Send a message to one worker. Never blocks: if that worker is gone or its queue is full,
    ZeroMQ drops the message silently. Blobs are sent zero-copy: don't mutate them afterwards.
    `track`: return a MessageTracker whose `done` says when libzmq has let go of the blobs
    (sent, or dropped with the connection): until then their memory stays pinned."""
    return router.send_multipart([identity, *encode(message, blobs)], copy=False, track=track)


def peer_address(frame: zmq.Frame) -> str:
    """The sender's IP address ("" if the transport has none)."""
    try:
        return frame.get("Peer-Address") or ""
    except zmq.ZMQError:
        return ""


def peer_key(frame: zmq.Frame) -> str:
    """A closed swarm's authenticated CURVE public key of the sender (Z85), or "" if open."""
    try:
        return frame.get("User-Id") or ""
    except zmq.ZMQError:
        return ""
