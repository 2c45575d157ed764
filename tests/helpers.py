"""The one place tests start real processes: the CLI as a subprocess, free ports, clean environments,
and cleanup of whatever a test's processes left running.

Fast, in-process tests do not need this module; the proofs (marked ``proof``) do.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from mnist_dist import env

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables (a test is never one rank of a launch),
    wandb off unless the test says otherwise, unbuffered output."""
    base = {k: v for k, v in os.environ.items() if k not in env.LAUNCHER_VARS}
    return {"WANDB_MODE": "disabled", **base, "PYTHONUNBUFFERED": "1", **extra}


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run `mnist-dist ARGS` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "mnist_dist.cli", *args],
        cwd=cwd, env=clean_env(**(env or {})), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def ours(pid: int, marker: str) -> bool:
    """Whether pid is alive and was started by this test (its environment names the test's folder)."""
    try:
        return marker.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment names ``marker`` (torch's elastic agent starts its
    workers in sessions of their own, so killing a process group does not reach them)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid() and ours(int(proc.name), marker):
            with suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def rank_pid(marker: str, rank: int, timeout: float = 60) -> int:
    """The pid of rank ``rank`` among the processes whose environment names ``marker`` (the launcher
    and torch's agent have no RANK)."""
    needle = f"\0{env.RANK}={rank}\0".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            with suppress(OSError):
                environ = b"\0" + (proc / "environ").read_bytes()
                if proc.name.isdigit() and marker.encode() in environ and needle in environ:
                    return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"no process of rank {rank} marked {marker}")


@contextmanager
def started(
    cmd: list[str], tmp: Path, log: Path, environment: dict[str, str] | None = None, **env_extra: str
) -> Iterator[subprocess.Popen]:
    """Run cmd in its own session with TMPDIR inside ``tmp`` (which marks every process it starts);
    on the way out kill whatever of it is still alive, workers included. ``environment`` replaces
    the clean environment (its TMPDIR is still set to the marker)."""
    (tmp / "tmp").mkdir(exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp, env={**(environment or clean_env(**env_extra)), "TMPDIR": str(tmp / "tmp")},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            yield proc
        finally:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            kill_marked(str(tmp / "tmp"))


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.sentinel}",))
