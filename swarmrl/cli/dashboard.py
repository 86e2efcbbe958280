"""`swarmrl dashboard RUN`: serve a run folder's dashboard, for a finished run or one elsewhere.

The same page the trainer serves while it runs (trainer/dashboard.py), read from the folder:
metrics.jsonl and workers.json, re-read at every poll, so a run still going (another process
writing the folder) keeps updating. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from swarmrl.base.config import LoggingConfig


def add_parser(commands: Any) -> None:
    dashboard = commands.add_parser(
        "dashboard", help="serve a run folder's dashboard (a finished run, or one elsewhere)"
    )
    dashboard.add_argument("run_folder", type=Path, help="the run folder (runs/NAME)")
    dashboard.add_argument(
        "--bind",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where to listen (port 0: a free one; a non-loopback host needs the printed token)",
    )
    dashboard.set_defaults(handler=run, overrides_allowed=False)


def run(arguments: argparse.Namespace) -> int:
    from swarmrl.trainer.dashboard import Dashboard

    folder = arguments.run_folder
    if not (folder / "config.toml").is_file():
        print(f"swarmrl: {folder}: not a run folder (no config.toml)", file=sys.stderr)
        return 2
    try:
        address = LoggingConfig(dashboard=arguments.bind).dashboard_address
    except ValidationError:
        address = None
    if address is None:
        print(f"swarmrl: --bind: expected HOST:PORT, got {arguments.bind!r}", file=sys.stderr)
        return 2
    try:
        dashboard = Dashboard(folder, *address)
    except OSError as error:
        print(f"swarmrl: cannot listen on {arguments.bind}: {error}", file=sys.stderr)
        return 2
    print(f"swarmrl: dashboard of {folder} at {dashboard.url} (Ctrl-C stops it)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # the way to stop it
        dashboard.serve()
    return 0
