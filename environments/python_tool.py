"""The `python` tool: run a program in the bubblewrap sandbox and read what it prints.

The same sandbox as the code rewards (rewards/sandbox.py): no network, no host files, a
private /tmp, limits on time, memory, processes and output. The trainer re-runs every call in
its own sandbox to verify a worker's episode, so a program whose output is not a function of
its source (it reads the clock or unseeded randomness) fails that check even for an honest
worker.
"""

from __future__ import annotations

from swarmrl.environments.tools import tool
from swarmrl.rewards.sandbox import Limits, run_python

TIMEOUT_S = 5.0


@tool
def python(code: str) -> str:
    """Run a Python program and return what it prints (standard output, then any error).

    Args:
        code: the program's source
    """
    result = run_python(code, limits=Limits(timeout_s=TIMEOUT_S))
    if result.timed_out:
        return f"{result.stdout}error: the program ran past {TIMEOUT_S:g} s"
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
        return f"{result.stdout}error: {last[0]}"
    return result.stdout
