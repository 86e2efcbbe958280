"""`swarmrl ledger verify RUN` and `swarmrl ledger export RUN`: a run's contribution chain.

`verify` checks the hash chain and the trainer's seals in `contributions.jsonl`
(trainer/contributions.py) and names every line where an edit, a removed line or a reordering
breaks it; it exits 1 on a broken chain, 2 when there is no chain to read. `export` gives the
per-worker totals a payout script needs, as CSV or JSON, counting only lines a valid seal
covers, and refuses (exit 1) a chain that does not verify. Both check the seals against the
run's own `ledger.pub` unless `--public-key` names the one the trainer's operator published
(a folder's own key proves only that whoever holds its secret signed it).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

FIELDS = [
    "worker",
    "key",
    "credited_samples",
    "accepted_samples",
    "accepted_leases",
    "rejected_samples",
    "revoked_samples",
    "reward_sum",
    "first",
    "last",
]


def add_parser(commands: Any) -> None:
    ledger = commands.add_parser(
        "ledger", help="verify a run's contribution ledger, or export per-worker totals"
    )
    actions = ledger.add_subparsers(dest="ledger_command", required=True)
    verify = actions.add_parser(
        "verify", help="check the hash chain and the trainer's signatures; exit 1 if broken"
    )
    export = actions.add_parser("export", help="per-worker totals of the signed chain")
    for action in (verify, export):
        action.add_argument("run_folder", type=Path, help="the run folder (runs/NAME)")
        action.add_argument(
            "--public-key",
            type=Path,
            metavar="PEM_FILE",
            help="the trainer's ledger public key as its operator published it "
            "(default: ledger.pub in the run folder)",
        )
    export.add_argument("--format", choices=["csv", "json"], default="csv")
    export.add_argument("--out", type=Path, metavar="FILE", help="write here (default: stdout)")
    ledger.set_defaults(handler=run, overrides_allowed=False)


def run(arguments: argparse.Namespace) -> int:
    from swarmrl.trainer.contributions import CHAIN_FILE, verify

    folder = arguments.run_folder
    try:
        result = verify(folder, arguments.public_key)
    except (OSError, ValueError) as error:
        print(f"swarmrl: {folder}: cannot read the contribution ledger: {error}", file=sys.stderr)
        return 2
    chain = folder / CHAIN_FILE
    if arguments.ledger_command == "verify":
        print(
            f"{chain}: {result.lines} lines, {result.seals} seals, "
            f"signed with Ed25519 key {result.key}"
        )
    if not result.ok:
        print(f"{chain}: BROKEN ({len(result.problems)} problems):", file=sys.stderr)
        for problem in result.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    unsigned = result.lines - result.signed_through
    if unsigned:
        print(
            f"{chain}: the last {unsigned} lines are chained but not signed yet (the run is "
            "live, or stopped before its next seal); export leaves them out",
            file=sys.stderr,
        )
    if arguments.ledger_command == "verify":
        print(f"ok: the chain is intact and signed through line {result.signed_through}")
        return 0
    text = _export(folder, result.signed_through, result.key, arguments.format)
    if arguments.out is None:
        sys.stdout.write(text)
    else:
        arguments.out.write_text(text)
    return 0


def _export(folder: Path, through: int, key: str, form: str) -> str:
    from swarmrl.trainer.contributions import totals

    rows = sorted(totals(folder, through).values(), key=lambda row: row["worker"])
    if form == "json":
        document = {"run": folder.name, "ledger_key": key, "signed_through": through}
        return json.dumps({**document, "workers": rows}, indent=1) + "\n"
    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
