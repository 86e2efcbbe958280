"""Running untrusted Python programs: a bubblewrap sandbox, rlimits, a timeout, a bounded pool.

Every program runs in `bwrap` (bubblewrap) with:
- no network, and new PID, IPC, UTS and cgroup namespaces; `--die-with-parent`, a new session;
- a fresh size-capped tmpfs at /tmp as the only writable place (also the working directory);
- read-only: /usr (shared libraries), the interpreter's own prefix with its site-packages
  hidden, and nothing else: not the home folder, the project, the venv or the trainer's runs;
- a cleared environment and `python -I` (no PYTHON* variables, no user site, no script dir);
- rlimits through `prlimit`: CPU seconds, address space, file size, processes, no core dumps;
- a wall-clock timeout (the whole sandbox is killed) and an output cap.

RLIMIT_NPROC does not apply to root, so as root the sandbox runs without a user namespace and
`setpriv` drops the program to a fresh unprivileged uid per run (from 2,000,000,000 up); as
another user an unprivileged user namespace holds it. Either way `prlimit` runs inside, after
the namespaces exist, so the process limit counts only the sandbox's own processes (set on
bwrap, it would count every thread of the trainer's user).
Program text and stdin travel as in-memory files (memfd); stdout and stderr land in memfds,
which RLIMIT_FSIZE bounds.

`SWARMRL_UNSAFE_NO_SANDBOX=1` runs programs as bare subprocesses (rlimits and timeout only),
logged loudly; `SWARMRL_SANDBOX_WORKERS` sets the pool size (default 2).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

logger = logging.getLogger(__name__)

UNSAFE_ENV = "SWARMRL_UNSAFE_NO_SANDBOX"
WORKERS_ENV = "SWARMRL_SANDBOX_WORKERS"
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `sudo apt-get install -y bubblewrap`, "
    "Fedora: `sudo dnf install -y bubblewrap`, Arch: `sudo pacman -S bubblewrap`), "
    f"or set {UNSAFE_ENV}=1 to run untrusted programs without a sandbox (unsafe)"
)
SANDBOX_UID_BASE = 2_000_000_000  # an unused uid range: one uid per run, as root
_RUN_IDS = itertools.count()
_MB = 1 << 20


class SandboxUnavailable(RuntimeError):
    """bubblewrap (or prlimit/setpriv) is missing or cannot start a sandbox here."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 3.0  # wall clock for one run; CPU seconds are capped at its ceiling
    memory_mb: int = 512  # address space per process
    file_size_mb: int = 16  # any one file written, stdout and stderr included
    processes: int = 8  # processes and threads of the program (worst case 8 x memory_mb)
    output_bytes: int = 1 << 20  # stdout beyond this counts as a failed run
    tmpfs_mb: int = 64  # the writable /tmp


@dataclass(frozen=True)
class RunResult:
    returncode: int | None  # None when the run timed out
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool  # stdout passed `output_bytes`
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.truncated


def default_workers() -> int:
    return max(1, int(os.environ.get(WORKERS_ENV, "2")))


def sandbox_enabled() -> bool:
    """True unless the unsafe opt-out is set; raises SandboxUnavailable when bwrap cannot run."""
    if os.environ.get(UNSAFE_ENV, "") not in ("", "0"):
        _warn_unsafe()
        return False
    check_sandbox()
    return True


@functools.cache
def _warn_unsafe() -> None:
    logger.warning(
        "!!! %s is set: untrusted programs run WITHOUT a sandbox, with the trainer's user, "
        "files and network. Only rlimits and a timeout hold them. Never do this in a swarm "
        "that accepts workers you do not trust. !!!",
        UNSAFE_ENV,
    )


@functools.cache
def check_sandbox() -> None:
    """Fail early and clearly when the sandbox cannot run (checked once per process)."""
    tools = ["bwrap", "prlimit"] + (["setpriv"] if os.geteuid() == 0 else [])
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if "bwrap" in missing:
        raise SandboxUnavailable(f"code rewards run programs in bubblewrap: {INSTALL_HINT}")
    if missing:
        raise SandboxUnavailable(f"{', '.join(missing)} not found: install util-linux")
    probe = run_python("print(6 * 7)", limits=Limits(timeout_s=30), sandbox=True)
    if probe.stdout.strip() != "42":
        raise SandboxUnavailable(
            f"bubblewrap cannot start a sandbox here (exit {probe.returncode}): "
            f"{probe.stderr.strip()[-500:]}; unprivileged user namespaces may be disabled "
            "(sysctl kernel.unprivileged_userns_clone=1), or bwrap is older than 0.8 (needs "
            f"--size); otherwise {INSTALL_HINT}"
        )


def _interpreter() -> str:
    """The base interpreter (a venv's python would expose the venv and this project)."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


@functools.cache
def _visible_paths() -> tuple[list[str], list[str]]:
    """Read-only binds (the interpreter's prefix, /usr) and the site-packages to hide."""
    binds = ["/usr"]
    for path in (sys.base_prefix, os.path.dirname(_interpreter())):
        path = os.path.realpath(path)
        if not any(path == b or path.startswith(b + "/") for b in binds):
            binds.append(path)
    hidden = [p for p in site.getsitepackages([sys.base_prefix]) if os.path.isdir(p)]
    return binds, hidden


def _limit_args(limits: Limits) -> list[str]:
    return [
        "prlimit",
        f"--cpu={max(1, math.ceil(limits.timeout_s))}",
        f"--as={limits.memory_mb * _MB}",
        f"--fsize={limits.file_size_mb * _MB}",
        f"--nproc={limits.processes}",
        "--core=0",
        "--",
    ]


def _bwrap_args(limits: Limits, script_fd: int, info_fd: int) -> list[str]:
    binds, hidden = _visible_paths()
    args = ["bwrap", "--die-with-parent", "--new-session", "--clearenv", "--info-fd", str(info_fd)]
    as_root = os.geteuid() == 0
    if as_root:  # no user namespace: it would map the program to root, which NPROC ignores
        args += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
        args += ["--unshare-cgroup-try", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-all"]
    for path in binds:  # parents made traversable: the home folder may be 0700
        parents = [os.path.dirname(path)]
        while parents[-1] != "/":
            parents.append(os.path.dirname(parents[-1]))
        for parent in reversed(parents[:-1]):
            args += ["--perms", "0755", "--dir", parent]
        args += ["--ro-bind", path, path]
    for top in ("/bin", "/lib", "/lib32", "/lib64", "/sbin"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for path in hidden:
        args += ["--tmpfs", path, "--remount-ro", path]
    args += ["--dev", "/dev", "--proc", "/proc"]
    args += ["--size", str(limits.tmpfs_mb * _MB), "--perms", "1777", "--tmpfs", "/tmp"]
    args += ["--file", str(script_fd), "/tmp/main.py", "--chdir", "/tmp"]
    if as_root:
        uid = SANDBOX_UID_BASE + next(_RUN_IDS) % 1_000_000
        args += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        args += ["--no-new-privs", "--"]
    return args


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read(fd: int, cap: int) -> tuple[str, bool]:
    size = os.fstat(fd).st_size
    return os.pread(fd, min(size, cap), 0).decode("utf-8", "replace"), size > cap


def _stop(process: subprocess.Popen, info_fd: int | None) -> None:
    """Kill a run: the sandbox's PID 1 (whose exit waits until the kernel has killed every
    process in its namespace, so bwrap exits only then), else the whole process group."""
    if info_fd is not None:
        try:
            os.kill(json.loads(os.pread(info_fd, 4096, 0))["child-pid"], signal.SIGKILL)
            process.wait(timeout=10)
            return
        except (ValueError, KeyError, ProcessLookupError, subprocess.TimeoutExpired):
            pass
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_python(
    source: str, stdin: str = "", limits: Limits | None = None, sandbox: bool = True
) -> RunResult:
    """Run `source` as main.py with `stdin`; in the sandbox unless `sandbox` is False."""
    limits = limits or Limits()
    script = _memfd("main.py", source.encode())
    fds = [script, _memfd("stdin", stdin.encode()), _memfd("stdout"), _memfd("stderr")]
    workdir = None
    if sandbox:
        fds.append(_memfd("info"))
        command = _bwrap_args(limits, script, fds[4]) + _limit_args(limits)
        command += [_interpreter(), "-I", "/tmp/main.py"]
    else:
        workdir = tempfile.TemporaryDirectory(prefix="swarmrl-unsafe-")
        with open(os.path.join(workdir.name, "main.py"), "wb") as file:
            file.write(source.encode())
        command = [*_limit_args(limits), _interpreter(), "-I", "main.py"]
    try:
        start = time.monotonic()
        process = subprocess.Popen(
            command,
            stdin=fds[1],
            stdout=fds[2],
            stderr=fds[3],
            pass_fds=[script, *fds[4:]],
            cwd=workdir.name if workdir else "/",
            env={},
            start_new_session=True,
        )
        try:
            returncode: int | None = process.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _stop(process, fds[4] if sandbox else None)
            returncode = None
        seconds = time.monotonic() - start
        stdout, truncated = _read(fds[2], limits.output_bytes)
        stderr, _ = _read(fds[3], 4096)
        return RunResult(returncode, stdout, stderr, returncode is None, truncated, seconds)
    finally:
        for fd in fds:
            os.close(fd)
        if workdir is not None:
            workdir.cleanup()


def run_many(
    jobs: Sequence[tuple[str, str]],
    limits: Limits | None = None,
    workers: int | None = None,
    sandbox: bool | None = None,
) -> list[RunResult]:
    """Run (source, stdin) jobs, at most `workers` at once; `sandbox` None: sandbox_enabled()."""
    if not jobs:
        return []
    use_sandbox = sandbox_enabled() if sandbox is None else sandbox
    with ThreadPoolExecutor(workers or default_workers(), "sandbox") as pool:
        runs = [pool.submit(run_python, src, stdin, limits, use_sandbox) for src, stdin in jobs]
        return [run.result() for run in runs]
