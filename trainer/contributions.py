"""The contribution ledger: every verdict on a worker's work, in a hash chain the trainer signs.

`contributions.jsonl` in the run folder gets one JSON line per verdict: a submission accepted
or rejected (with the reason), and sequences the training step later masked out
(`revoked`). Each line carries its sequence number and the SHA-256 of the line before it, so
an edited, removed or reordered line breaks the chain at a place `verify` names. After every
step the trainer appends a `seal`: an Ed25519 signature, with a key of its own
(`ledger.key`, public half `ledger.pub`), over the hash of everything before it. Lines after
the last seal are chained but not yet signed. A resumed run continues the chain; a line cut
short by a crash (kill -9 mid-write) is dropped on resume and logged. `verify` checks the chain
against the run's `ledger.pub` or a public key its operator published; `totals` sums the chain
(through its last valid seal, for a payout script) per worker (`swarmrl ledger`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("trainer")

CHAIN_FILE = "contributions.jsonl"
KEY_FILE = "ledger.key"
PUBLIC_FILE = "ledger.pub"
GENESIS = "0" * 64  # the `prev` of the first line


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class ContributionLedger:
    """Appends verdicts and seals; safe to call from the network and the training thread."""

    def __init__(self, folder: Path) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.path = folder / CHAIN_FILE
        self._key: Ed25519PrivateKey = _load_or_make_key(folder)
        self._lock = threading.Lock()
        self.seq, self.prev = 0, GENESIS
        if self.path.exists():
            self.seq, self.prev = _recover(self.path)
        self._file = self.path.open("ab")

    def record(self, verdict: str, worker: str, **details: Any) -> None:
        """One verdict: `accepted`, `rejected` or `revoked`, for `worker`'s work."""
        self._append({"kind": verdict, "worker": worker, **details})

    def seal(self, step: int) -> None:
        """Sign the chain's head: everything before this line is covered by the signature."""
        with self._lock:
            message = _seal_message(self.seq + 1, step, self.prev)
            signature = base64.b64encode(self._key.sign(message)).decode()
            self._write({"kind": "seal", "step": step, "signature": signature})
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def _append(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._write(entry)

    def _write(self, entry: dict[str, Any]) -> None:
        self.seq += 1
        record = {"seq": self.seq, "time": round(time.time(), 3), **entry, "prev": self.prev}
        line = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
        self._file.write(line + b"\n")
        self._file.flush()
        self.prev = line_hash(line)


def _seal_message(seq: int, step: int, prev: str) -> bytes:
    return f"swarmrl-ledger-seal|{seq}|{step}|{prev}".encode()


def _load_or_make_key(folder: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    secret = folder / KEY_FILE
    if secret.exists():
        return serialization.load_pem_private_key(secret.read_bytes(), password=None)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (folder / PUBLIC_FILE).write_bytes(public)
    return key


def _recover(path: Path) -> tuple[int, str]:
    """(last seq, hash of the last line) of an existing chain; a torn last line is cut off."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropped a line cut short by a crash (%d bytes)", path, len(data) - keep)
        with path.open("r+b") as file:
            file.truncate(keep)
        data = data[:keep]
    lines = data.splitlines()
    if not lines:
        return 0, GENESIS
    return int(json.loads(lines[-1])["seq"]), line_hash(lines[-1])


@dataclass
class Verification:
    key: str = ""  # the signing key (raw Ed25519 public key, hex), to compare with a published one
    lines: int = 0
    seals: int = 0
    signed_through: int = 0  # the last line a valid seal covers
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(folder: Path, public_key: Path | None = None) -> Verification:
    """Check every line's sequence number and link, and every seal's signature: against
    `public_key` (a PEM file) if given, else the run folder's own ledger.pub."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    pem = (public_key or folder / PUBLIC_FILE).read_bytes()
    public = serialization.load_pem_public_key(pem)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    result = Verification(key=raw.hex())
    prev, expected_seq = GENESIS, 1
    for number, line in enumerate((folder / CHAIN_FILE).read_bytes().splitlines(), start=1):
        result.lines = number
        try:
            entry = json.loads(line)
            seq, link = int(entry["seq"]), str(entry["prev"])
        except (ValueError, KeyError, TypeError):
            result.problems.append(f"line {number}: not a ledger entry (edited?)")
            prev, expected_seq = line_hash(line), expected_seq + 1
            continue
        if link != prev:
            result.problems.append(
                f"line {number} (seq {seq}): does not follow line {number - 1}: that line was "
                "edited, or lines between them were removed or reordered"
            )
        if seq != expected_seq:
            result.problems.append(f"line {number}: seq {seq} where {expected_seq} was due")
        if entry.get("kind") == "seal":
            result.seals += 1
            signature = base64.b64decode(str(entry.get("signature", "")))
            try:
                public.verify(signature, _seal_message(seq, int(entry.get("step", -1)), link))
                if link == prev:
                    result.signed_through = number
            except InvalidSignature:
                result.problems.append(f"line {number}: seal signature does not verify")
        prev, expected_seq = line_hash(line), seq + 1
    return result


def totals(folder: Path, through: int | None = None) -> dict[str, dict[str, Any]]:
    """Per worker: accepted / rejected / revoked samples and leases, reward sum, first and last
    verdict time; of the first `through` lines (all if None)."""
    workers: dict[str, dict[str, Any]] = {}
    for line in (folder / CHAIN_FILE).read_bytes().splitlines()[:through]:
        entry = json.loads(line)
        if entry["kind"] == "seal":
            continue
        row = workers.setdefault(
            entry["worker"],
            {
                "worker": entry["worker"],
                "key": entry.get("key", ""),
                "accepted_samples": 0,
                "accepted_leases": 0,
                "rejected_samples": 0,
                "revoked_samples": 0,
                "reward_sum": 0.0,
                "first": entry["time"],
                "last": entry["time"],
            },
        )
        samples = int(entry.get("samples", 0))
        if entry["kind"] == "accepted":
            row["accepted_samples"] += samples
            row["accepted_leases"] += entry.get("lease") is not None  # not a later credit
            row["reward_sum"] += float(entry.get("reward_sum", 0.0))
        else:
            row[f"{entry['kind']}_samples"] += samples
        row["last"] = entry["time"]
    for row in workers.values():
        row["credited_samples"] = row["accepted_samples"] - row["revoked_samples"]
    return workers
