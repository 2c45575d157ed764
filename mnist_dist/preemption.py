"""Stopping at a checkpoint on a signal: SIGTERM/SIGUSR1 (a scheduler's preemption or time limit) and
SIGINT (Ctrl-C), and asking SLURM to run the job again.

The handler only records the signal; the loop asks ``should_stop`` at each step boundary, every rank
writes the checkpoint together, and the process exits with ``PREEMPTED_EXIT`` (75: run the same
command to continue) or, after SIGINT, ``INTERRUPTED_EXIT`` (130, the shell's code for Ctrl-C).
SIGINT is handled only while the loop runs: outside it there is nothing new to save, and a Ctrl-C
during setup or the final evaluation is the usual KeyboardInterrupt.

Under ``mnist-dist train --processes N`` every worker writes its pid into the launch folder
(``MNIST_DIST_LAUNCH_DIR``), so the launcher passes signals to the workers themselves, and each
worker that stopped at a checkpoint leaves a ``preempted-<rank>`` marker naming the signal, from
which the launcher takes its exit code. A worker that stops on purpose for another reason (a fault,
a refused value) leaves a ``stopped-<rank>`` marker with its exit code, and one that crashes a
``crashed-<rank>`` marker with its error in one line, for the launcher's message.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from contextlib import suppress
from pathlib import Path
from types import FrameType

import torch
from accelerate import Accelerator

from mnist_dist import env
from mnist_dist.config import TrainConfig
from mnist_dist.files import write_text_atomic

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): stopped on purpose; run the same command to continue
INTERRUPTED_EXIT = 128 + signal.SIGINT
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
GPU_CHECK_EVERY = 10  # on a GPU, reading the stop flag is a host sync: agree only every N steps
MARKER = "preempted"
STOPPED = "stopped"  # stopped-<rank>: the exit code (the rank printed why)
CRASHED = "crashed"  # crashed-<rank>: "<error type>: <its message's first line>"


def exit_code(signum: int) -> int:
    return INTERRUPTED_EXIT if signum == signal.SIGINT else PREEMPTED_EXIT


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; exit with ``exit_code``."""

    def __init__(self, checkpoint: Path, signum: int) -> None:
        self.checkpoint, self.signal, self.exit_code = checkpoint, signum, exit_code(signum)
        super().__init__(
            f"stopped by {signal.Signals(signum).name}: checkpoint {checkpoint}; run the same command "
            f"with --resume auto to continue (exit code {self.exit_code})"
        )


def _outranks(a: int | None, b: int) -> int:
    """Of two signals, the one the stop is reported as: the higher number, so a scheduler's
    SIGTERM (15) or SIGUSR1 (10) wins over a Ctrl-C's SIGINT (2), and --requeue still applies."""
    return max(a or 0, b)


class PreemptionWatch:
    """Records SIGTERM/SIGUSR1/SIGINT and lets all ranks agree on the step boundary to stop at.

    Ranks agree by an all-reduce (MAX) of the signal number, on every step on a CPU and every
    GPU_CHECK_EVERY steps (and at each epoch's last step) on a GPU, where reading the result waits
    for the queued kernels.
    """

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.signal: int | None = None
        self.every = 1 if accelerator.device.type == "cpu" else GPU_CHECK_EVERY
        # Python lets only the main thread install handlers; a loop run from another thread (a test,
        # a notebook) keeps running without preemption handling.
        in_main = threading.current_thread() is threading.main_thread()
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS if in_main}
        launch_dir = os.environ.get(env.LAUNCH_DIR)
        self._pid_file = Path(launch_dir) / f"pid-{accelerator.process_index}" if launch_dir else None
        if self._pid_file is not None:
            self._pid_file.write_text(str(os.getpid()))

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal = _outranks(self.signal, signum)

    def should_stop(self, step: int, boundary: bool = False) -> bool:
        """Collective when world > 1: call it on every rank after the same steps."""
        if self.accelerator.num_processes == 1:
            return self.signal is not None
        if step % self.every and not boundary:
            return False
        agreed = torch.tensor(self.signal or 0, device=self.accelerator.device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        self.signal = int(agreed.item()) or None  # the same on every rank, also those that got none
        return self.signal is not None

    def preempted(self, checkpoint: Path, cfg: TrainConfig) -> Preempted:
        """After the checkpoint: tell the launcher, ask SLURM to requeue (not after a Ctrl-C: the user
        meant to stop); return the exception to raise."""
        stop = Preempted(checkpoint, self.signal or signal.SIGTERM)
        launch_dir = os.environ.get(env.LAUNCH_DIR)
        if launch_dir:  # every rank: the first to exit may make the agent kill the others
            marker = Path(launch_dir) / f"{MARKER}-{self.accelerator.process_index}"
            write_text_atomic(marker, f"{signal.Signals(stop.signal).name}\n{checkpoint}\n")
        if self.accelerator.is_main_process:
            if cfg.requeue and stop.signal != signal.SIGINT:
                self.accelerator.print(requeue_slurm_job())
            self.accelerator.print(f"mnist-dist: {stop}")
        return stop

    def close(self) -> None:
        """Stop watching (idempotent): the previous handlers come back and the pid is unregistered."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._pid_file is not None:
            self._pid_file.unlink(missing_ok=True)


def slurm_job() -> str | None:
    """The id ``scontrol`` takes for this job: an array task's own ``<array job id>_<task id>``, since
    the array's job id (also the first task's SLURM_JOB_ID) names every task of the array."""
    array, task = os.environ.get(env.SLURM_ARRAY_JOB_ID), os.environ.get(env.SLURM_ARRAY_TASK_ID)
    if array and task:
        return f"{array}_{task}"
    return os.environ.get(env.SLURM_JOB_ID) or None


def requeue_slurm_job() -> str:
    """`scontrol requeue <this job>`: the job (in an array, this task only) goes back to the queue and
    reruns the same script."""
    job = slurm_job()
    if not job:
        return "mnist-dist: --requeue: not running under SLURM (no SLURM_JOB_ID); nothing to requeue"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"mnist-dist: scontrol requeue {job} failed: {e}"
    if done.returncode:
        return f"mnist-dist: scontrol requeue {job} failed ({done.returncode}): {done.stderr.strip()}"
    return f"mnist-dist: requeued SLURM job {job}"


def worker_pids(launch_dir: Path) -> list[int]:
    """The pids the workers of a launch registered (see PreemptionWatch); a file being written or
    removed right now is left out."""
    pids = []
    for path in Path(launch_dir).glob("pid-*"):
        with suppress(OSError, ValueError):
            pids.append(int(path.read_text()))
    return pids


def was_preempted(launch_dir: Path) -> signal.Signals | None:
    """The signal on which the workers of a launch stopped after writing a checkpoint, if they did."""
    markers = sorted(Path(launch_dir).glob(f"{MARKER}-*"))  # the same signal in each: ranks agree on it
    return signal.Signals[markers[0].read_text().split("\n", 1)[0]] if markers else None


def _own_marker(kind: str) -> Path | None:
    """This rank's marker of ``kind`` in its launch folder; None outside ``mnist-dist train --processes``."""
    launch_dir = os.environ.get(env.LAUNCH_DIR)
    return Path(launch_dir) / f"{kind}-{os.environ.get(env.RANK, '0')}" if launch_dir else None


def rank_started() -> None:
    """A rank (re)starting: its markers from an attempt that torch's agent restarted are stale."""
    for kind in (MARKER, STOPPED, CRASHED):
        marker = _own_marker(kind)
        if marker is not None:
            marker.unlink(missing_ok=True)


def on_purpose(code: int) -> int:
    """The exit code of a rank that stopped on purpose with ``code`` (a preemption, a fault, a refused
    value): 0 under the launcher, which takes ``code`` from the rank's marker. torch's elastic agent
    restarts every worker that exits non-zero (``--max-restarts``), which would resume a run that
    was told to stop or repeat a fault, and reports every failure as 1."""
    return 0 if os.environ.get(env.LAUNCH_DIR) else code


def stopped_on_purpose(code: int) -> int:
    """Record that this rank stopped with ``code`` (it prints why itself); return its exit code."""
    marker = _own_marker(STOPPED)
    if marker is not None:
        write_text_atomic(marker, f"{code}\n")
    return on_purpose(code)


def crashed(error: BaseException) -> None:
    """Record an unexpected error in one line for the launcher; the rank still exits non-zero, so
    that torch's agent restarts the group when --max-restarts allows it."""
    marker = _own_marker(CRASHED)
    if marker is not None:
        lines = str(error).strip().splitlines()
        write_text_atomic(marker, f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ") + "\n")


def _first(launch_dir: Path, kind: str) -> tuple[str, str] | None:
    """The rank and text of the earliest marker of ``kind``: the first failure is the cause; the
    errors of its peers follow from it."""
    found = []
    for marker in Path(launch_dir).glob(f"{kind}-*"):
        with suppress(OSError):
            found.append(
                (marker.stat().st_mtime_ns, marker.name.removeprefix(f"{kind}-"), marker.read_text())
            )
    return min(found)[1:] if found else None


def stopped_code(launch_dir: Path) -> int | None:
    """The exit code a rank of the launch stopped with on purpose, if one did."""
    first = _first(launch_dir, STOPPED)
    return int(first[1]) if first and first[1].strip().isdigit() else None


def crash_cause(launch_dir: Path) -> str | None:
    """'rank R: <error>' of the first rank that crashed, if one lived to say it."""
    first = _first(launch_dir, CRASHED)
    return f"rank {first[0]}: {first[1].strip()}" if first else None
