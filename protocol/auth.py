"""Closed swarms: CURVE key files, the trainer's allowlist of worker keys, and its ZAP handler.

An open swarm (the default) accepts anyone and relies on checking every submission. A closed
swarm encrypts every connection with CurveZMQ and lets in only workers whose public key is
on the trainer's allowlist: libzmq asks a ZAP handler (pyzmq's ThreadAuthenticator, started
here) about each connecting key, and a refused key gets no message at all, not even the run
spec. transport.py sets the socket options; this file owns the keys and the handler.

Key files are pyzmq/czmq certificates (`zmq.auth.create_certificates`): `NAME.key` holds the
public key, `NAME.key_secret` both keys and is readable only by its owner. Keys are Z85 text,
40 characters. An allowlist file holds one public key per line; a line starting with `#` is a
comment, and a key may be followed by `# a note`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger("auth")

ZAP_DOMAIN = "swarmrl"
KEY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class KeyFileError(ValueError):
    """A key or allowlist file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes = field(repr=False)  # never in a log line or a test failure


@dataclass(frozen=True)
class CurveServer:
    """The trainer's side of a closed swarm."""

    keys: KeyPair
    allowed: frozenset[bytes]  # worker public keys (Z85) from allow_file
    allow_file: str

    def accepts(self, key: bytes) -> bool:
        """Listed keys, and the trainer's own pair, which `swarmrl run`'s local workers use."""
        return key in self.allowed or key == self.keys.public


@dataclass(frozen=True)
class CurveClient:
    """A worker's side of a closed swarm: its key pair and the trainer's public key."""

    keys: KeyPair
    trainer_public: bytes


def is_key(text: bytes) -> bool:
    """Whether `text` is a CURVE key in Z85 (40 characters for 32 bytes)."""
    try:
        return len(text) == 40 and len(z85.decode(text)) == 32
    except (ValueError, KeyError):  # z85.decode: bad length, or a character outside Z85
        return False


def new_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (mode 600) into `folder`; never overwrites."""
    if not KEY_NAME.fullmatch(name):
        raise KeyFileError(f"{name!r}: a key name is letters, digits, '_', '.', '-'")
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(f"{path}: already exists; pick another name or remove it")
    folder.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(umask)
    secret.chmod(0o600)
    public.chmod(0o644)
    return public, secret


def load_key_pair(path: str | Path) -> KeyPair:
    """The key pair in a secret key file (NAME.key_secret)."""
    public, secret = _read_certificate(Path(path))
    if secret is None:
        raise KeyFileError(
            f"{path}: holds only a public key; pass the secret key file (NAME.key_secret)"
        )
    if not is_key(secret):
        raise KeyFileError(f"{path}: malformed secret key (expected 40 Z85 characters)")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{path}: the public key does not belong to the secret key")
    return KeyPair(public=public, secret=secret)


def load_public_key(key_or_file: str) -> bytes:
    """A public key given as its 40 Z85 characters or as a key file (public or secret)."""
    if is_key(key_or_file.encode()):
        return key_or_file.encode()
    path = Path(key_or_file)
    if not path.exists():
        raise KeyFileError(
            f"{key_or_file}: neither a public key (40 Z85 characters) nor an existing key file"
        )
    return _read_certificate(path)[0]


def read_allowlist(path: str | Path) -> frozenset[bytes]:
    """The worker public keys listed in an allowlist file."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise KeyFileError(f"{path}: cannot read the allowlist ({error.strerror})") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: the allowlist is not a text file") from None
    keys = set()
    for number, line in enumerate(lines, 1):
        key, *note = line.split(maxsplit=1) or [""]
        if is_key(key.encode()) and (not note or note[0].startswith("#")):
            keys.add(key.encode())
        elif key and not key.startswith("#"):
            raise KeyFileError(
                f"{path}, line {number}: not a public key (40 Z85 characters, then "
                f"optionally '# a note'): {line.strip()[:60]!r}"
            )
    return frozenset(keys)


def load_curve_server(allow_keys: str, trainer_key: str | None) -> CurveServer:
    """The trainer's key pair and the worker keys it accepts."""
    if trainer_key is None:
        raise KeyFileError(
            f"a closed swarm (allow_keys = {allow_keys}) needs swarm.trainer_key, "
            "the trainer's secret key file"
        )
    return CurveServer(
        keys=load_key_pair(trainer_key),
        allowed=read_allowlist(allow_keys),
        allow_file=str(allow_keys),
    )


def load_curve_client(key_file: str, trainer_key: str) -> CurveClient:
    """A worker's --key (its secret key file) and --trainer-key (a key or a key file)."""
    return CurveClient(keys=load_key_pair(key_file), trainer_public=load_public_key(trainer_key))


def start_authenticator(context: zmq.Context, server: CurveServer) -> ThreadAuthenticator:
    """Start the ZAP handler that checks worker keys against the allowlist.

    It runs on a shadow of `context` (same libzmq context, so it serves that context's
    sockets), which keeps its sockets out of `context.destroy()`: whoever closes the router
    must stop it first (AuthenticatedRouter does), or terminating the context waits forever.
    """
    authenticator = ThreadAuthenticator(zmq.Context.shadow(context), log=log)
    authenticator.start()
    authenticator.configure_curve_callback(ZAP_DOMAIN, _Allowlist(server))
    log.info(
        "closed swarm (CURVE): %d worker keys allowed from %s; workers connect with "
        "--trainer-key '%s'",
        len(server.allowed),
        server.allow_file,
        server.keys.public.decode(),
    )
    return authenticator


class AuthenticatedRouter(zmq.Socket):
    """A socket whose ZAP handler stops when it closes (also inside `context.destroy()`)."""

    authenticator: ThreadAuthenticator | None = None

    def close(self, linger: int | None = None) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        super().close(linger)


class _Allowlist:
    """ThreadAuthenticator's credentials provider: is this key on the list?"""

    def __init__(self, server: CurveServer) -> None:
        self.server = server
        self.refused: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        if self.server.accepts(key):
            return True
        if key not in self.refused:  # a refused worker retries: say it once per key
            self.refused.add(key)
            log.warning(
                "refused a worker whose key %s is not in %s",
                key.decode(),
                self.server.allow_file,
            )
        return False


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise KeyFileError(f"{path}: key file not found")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as error:
        raise KeyFileError(f"{path}: cannot read the key file ({error.strerror})") from None
    except ValueError:
        raise KeyFileError(f"{path}: not a key file (no public-key line)") from None
    if not is_key(public):
        raise KeyFileError(f"{path}: malformed public key (expected 40 Z85 characters)")
    return public, secret
