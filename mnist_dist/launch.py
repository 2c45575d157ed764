"""Start N training ranks (on one or several nodes) through Accelerate's launcher.

On a CPU machine ``accelerate launch --cpu --num_processes N`` starts ONE process; ``--multi_gpu``
starts N real ranks through torch's elastic agent, and the ranks pick gloo because
``make_accelerator`` passes ``cpu=True`` without a GPU. Each rank checks that it really has the world
size asked for (``MNIST_DIST_EXPECTED_WORLD``).

The config crosses into the ranks once, as the validated ``TrainConfig`` in ``config.json`` of a
per-launch folder: every rank runs ``python -m mnist_dist.train --config <that file>``.

Signals: SIGTERM/SIGUSR1/SIGINT sent to this process go to the workers themselves (they register
their pids in the launch folder), not through torch's elastic agent: the agent turns a signal into a
shutdown of its workers with a 30 s deadline, and a second signal (SLURM signals every process of
the step) aborts that wait. The agent is started with SIGINT ignored, so a Ctrl-C in the terminal
(which reaches this process and the agent) stops the workers only through us, as SIGINT. When the
workers stopped after writing a checkpoint, ``launch`` returns their exit code (75, or 130 after
SIGINT); the agent itself only reports a failed worker.

Restarts (``--max-restarts K``): when a rank dies, the agent stops the node's other ranks and starts
them all again, up to K times; each resumes from the run's newest checkpoint (``--resume auto``).
Ranks that stop on purpose (a checkpoint on a signal, a fault, a refused value) exit 0 so that the
agent does not restart them, and leave their code in the launch folder (``preemption.on_purpose``):
``launch`` exits with it, and with the first crashed rank's error when the restarts ran out.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType

from mnist_dist.config import TrainConfig
from mnist_dist.env import EXPECTED_WORLD, LAUNCH_DIR, PYTHONUNBUFFERED, SIGNALS_TO_HANDLE
from mnist_dist.files import write_text_atomic
from mnist_dist.preemption import (
    INTERRUPTED_EXIT,
    SIGNALS,
    crash_cause,
    exit_code,
    stopped_code,
    was_preempted,
    worker_pids,
)

CONFIG_FILE = "config.json"  # in the launch folder
# What the agent handles itself (torch >= 2.9; its default set is TERM, INT, HUP, QUIT): SIGUSR1 too,
# so that SLURM's --signal does not kill it, and not SIGINT, which it must ignore (see above).
AGENT_SIGNALS = "SIGTERM,SIGHUP,SIGQUIT,SIGUSR1"


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    cfg: TrainConfig,
    processes: int,
    config_file: Path,
    *,
    nodes: int = 1,
    node_rank: int = 0,
    main_address: str = "127.0.0.1",
    main_port: int | None = None,
    max_restarts: int = 0,
) -> list[str]:
    """The accelerate launch command line that starts this node's ranks of the run."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes", str(processes * nodes),
        "--num_machines", str(nodes),
        "--machine_rank", str(node_rank),
        "--main_process_ip", main_address,
        "--main_process_port", str(main_port or free_port()),
        "--mixed_precision", cfg.precision,
        "--dynamo_backend", "no",
        "--monitor_interval", "0.1",  # torchrun's default: a finished or lost rank is seen within 0.1 s
        "--max_restarts", str(max_restarts),
    ]  # fmt: skip
    if nodes > 1:
        cmd.append("--same_network")
    return [*cmd, "-m", "mnist_dist.train", "--config", str(config_file)]


def launch(
    cfg: TrainConfig,
    processes: int,
    *,
    nodes: int = 1,
    node_rank: int = 0,
    main_address: str = "127.0.0.1",
    main_port: int | None = None,
    max_restarts: int = 0,
) -> tuple[int, str | None]:
    """Run this node's ranks to completion; return the exit code and, when the ranks failed without
    saying why themselves, the cause in one line. A stop at a checkpoint gives 75 (SIGTERM/SIGUSR1)
    or 130 (SIGINT), a fault its own code (``faults``); a crash that ``max_restarts`` restarts of
    the ranks did not get past ends the launch."""
    env = {**os.environ, EXPECTED_WORLD: str(processes * nodes), SIGNALS_TO_HANDLE: AGENT_SIGNALS}
    env.setdefault(PYTHONUNBUFFERED, "1")
    with tempfile.TemporaryDirectory(prefix="mnist-dist-launch-") as folder:
        config_file = write_text_atomic(Path(folder) / CONFIG_FILE, cfg.to_json())
        cmd = launch_command(
            cfg, processes, config_file, nodes=nodes, node_rank=node_rank, main_address=main_address,
            main_port=main_port, max_restarts=max_restarts,
        )  # fmt: skip
        code = run_ranks(cmd, {**env, LAUNCH_DIR: folder}, Path(folder))
        return code, _cause(Path(folder), code)


def run_ranks(cmd: list[str], env: dict[str, str], launch_dir: Path) -> int:
    """Run the launcher command ``cmd`` to its end, passing signals to its workers. Returns the
    workers' code when they stopped at a checkpoint, 130 when a Ctrl-C stopped them without one
    (outside their training loop), else the launcher's own."""
    with _forwarding_signals(cmd, env, launch_dir) as (proc, received):
        code = proc.wait()
    stopped = was_preempted(launch_dir)
    if stopped is not None:
        return exit_code(stopped)
    if signal.SIGINT in received:
        return INTERRUPTED_EXIT
    on_purpose = stopped_code(launch_dir)
    return code if on_purpose is None else on_purpose


def _cause(launch_dir: Path, code: int) -> str | None:
    """Why the launch failed, when no rank said it: the first crashed rank's error, if one lived to
    record it (a rank killed by a signal cannot)."""
    if not code or was_preempted(launch_dir) or stopped_code(launch_dir) is not None:
        return None
    return crash_cause(launch_dir) or f"a rank exited with code {code} or was killed (its output is above)"


@contextmanager
def _forwarding_signals(
    cmd: list[str], env: dict[str, str], launch_dir: Path
) -> Iterator[tuple[subprocess.Popen, set[int]]]:
    """Start ``cmd`` with SIGINT ignored, then, while it runs, pass SIGTERM/SIGUSR1/SIGINT to the
    registered workers (before any has registered, SIGTERM to the launcher, which stops them: there
    is nothing to save yet). Yields the process and the signals received so far."""
    received: set[int] = set()

    def forward(signum: int, frame: FrameType | None) -> None:
        received.add(signum)
        for pid, sig in [(pid, signum) for pid in worker_pids(launch_dir)] or [(proc.pid, signal.SIGTERM)]:
            with suppress(ProcessLookupError):  # already gone
                os.kill(pid, sig)

    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # what the child inherits (handlers are not)
        proc = subprocess.Popen(cmd, env=env)
        for sig in SIGNALS:
            signal.signal(sig, forward)
        yield proc, received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
