"""The contribution ledger: a hash chain of verdicts, sealed with Ed25519, checked and summed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from swarmrl.trainer.contributions import CHAIN_FILE, KEY_FILE, ContributionLedger, totals, verify


def write_chain(folder: Path) -> None:
    ledger = ContributionLedger(folder)
    ledger.record(
        "accepted", "alice", lease="L1", prompts=["p0"], samples=4, version=0, reward_sum=2.0
    )
    ledger.record("rejected", "mallory", lease="L2", reason="text_mismatch", samples=4)
    ledger.seal(step=1)
    ledger.record(
        "accepted", "alice", lease="L3", prompts=["p1"], samples=4, version=1, reward_sum=1.0
    )
    ledger.record("revoked", "alice", reason="logprob_mismatch", samples=1, prompts=["p1"])
    ledger.seal(step=2)
    ledger.close()


def lines(folder: Path) -> list[bytes]:
    return (folder / CHAIN_FILE).read_bytes().splitlines(keepends=True)


def test_an_untouched_chain_verifies_and_sums_per_worker(tmp_path: Path) -> None:
    write_chain(tmp_path)
    result = verify(tmp_path)
    assert result.ok, result.problems
    assert (result.lines, result.seals, result.signed_through) == (6, 2, 6)
    assert stat.S_IMODE(os.stat(tmp_path / KEY_FILE).st_mode) == 0o600
    sums = totals(tmp_path)
    assert sums["alice"]["accepted_samples"] == 8 and sums["alice"]["revoked_samples"] == 1
    assert sums["alice"]["credited_samples"] == 7 and sums["alice"]["reward_sum"] == 3.0
    assert sums["mallory"]["rejected_samples"] == 4 and sums["mallory"]["credited_samples"] == 0


def test_one_flipped_byte_is_found(tmp_path: Path) -> None:
    write_chain(tmp_path)
    chain = lines(tmp_path)
    chain[0] = chain[0].replace(b'"samples":4', b'"samples":9')  # alice claims more
    (tmp_path / CHAIN_FILE).write_bytes(b"".join(chain))
    result = verify(tmp_path)
    assert not result.ok
    assert result.problems[0].startswith("line 2 (seq 2): does not follow line 1")


def test_a_removed_line_is_found(tmp_path: Path) -> None:
    write_chain(tmp_path)
    chain = lines(tmp_path)
    del chain[1]  # mallory's rejection disappears
    (tmp_path / CHAIN_FILE).write_bytes(b"".join(chain))
    problems = verify(tmp_path).problems
    assert any(p.startswith("line 2 (seq 3): does not follow line 1") for p in problems), problems
    assert "line 2: seq 3 where 2 was due" in problems


def test_two_reordered_lines_are_found(tmp_path: Path) -> None:
    write_chain(tmp_path)
    chain = lines(tmp_path)
    chain[3], chain[4] = chain[4], chain[3]
    (tmp_path / CHAIN_FILE).write_bytes(b"".join(chain))
    problems = verify(tmp_path).problems
    assert "line 4: seq 5 where 4 was due" in problems, problems


def test_a_forged_seal_does_not_verify(tmp_path: Path) -> None:
    write_chain(tmp_path)
    chain = lines(tmp_path)
    seal = json.loads(chain[2])
    seal["step"] = 99  # the signature covered step 1
    chain[2] = json.dumps(seal, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    (tmp_path / CHAIN_FILE).write_bytes(b"".join(chain))
    problems = verify(tmp_path).problems
    assert "line 3: seal signature does not verify" in problems, problems


def test_a_resumed_chain_continues_and_a_torn_line_is_dropped(tmp_path: Path) -> None:
    write_chain(tmp_path)
    with (tmp_path / CHAIN_FILE).open("ab") as file:
        file.write(b'{"kind":"accepted","seq":7,"wor')  # kill -9 in the middle of a write
    again = ContributionLedger(tmp_path)
    again.record("accepted", "bob", lease="L9", samples=4, reward_sum=0.0)
    again.seal(step=3)
    again.close()
    result = verify(tmp_path)
    assert result.ok, result.problems
    assert (result.lines, result.seals) == (8, 3)
    assert totals(tmp_path)["bob"]["accepted_samples"] == 4
