"""Start N training ranks (on one or several nodes) through Accelerate's launcher.

On a CPU machine ``accelerate launch --cpu --num_processes N`` starts ONE process (GUIDE pitfall
4); ``--multi_gpu`` starts N real ranks through torch's elastic agent, and the ranks pick gloo
because ``make_accelerator`` passes ``cpu=True`` without a GPU. Each rank checks that it really has
the world size asked for (``MNIST_DIST_EXPECTED_WORLD``).

Preemption: SIGTERM/SIGUSR1 sent to this process go to the workers themselves (they register their
pids in a per-launch folder), not through torch's elastic agent: the agent turns a signal into a
shutdown of its workers with a 30 s deadline, and a second signal (SLURM signals every process of
the step) aborts that wait. When the workers stopped after writing a checkpoint, ``launch`` returns
``PREEMPTED_EXIT`` (the agent itself only reports a failed worker).
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
from dataclasses import fields
from pathlib import Path
from types import FrameType

from mnist_dist.checkpoint import LAUNCH_DIR_ENV, PREEMPTED_EXIT, PreemptionWatch, was_preempted, worker_pids
from mnist_dist.config import TrainConfig
from mnist_dist.train import EXPECTED_WORLD_ENV


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_args(cfg: TrainConfig) -> list[str]:
    """The resolved config as explicit CLI options, so every rank gets exactly the parent's config."""
    args: list[str] = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def launch_command(
    cfg: TrainConfig,
    processes: int,
    nodes: int = 1,
    node_rank: int = 0,
    main_address: str = "127.0.0.1",
    main_port: int | None = None,
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
        "--monitor_interval", "1",
    ]  # fmt: skip
    if nodes > 1:
        cmd.append("--same_network")
    return [*cmd, "-m", "mnist_dist.train", *config_args(cfg)]


def launch(cfg: TrainConfig, processes: int, **kw: object) -> int:
    """Run the ranks to completion; a crash in any rank ends the whole launch with its code, and
    a stop on SIGTERM/SIGUSR1 after a checkpoint with PREEMPTED_EXIT."""
    nodes = int(kw.get("nodes", 1))  # type: ignore[arg-type]
    env = dict(os.environ)
    env[EXPECTED_WORLD_ENV] = str(processes * nodes)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # torch >= 2.9 reads this: the agent then also handles SIGUSR1 (SLURM's --signal) when it is
    # signalled directly, instead of dying of it (the default set is TERM, INT, HUP, QUIT).
    env["PET_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    cmd = launch_command(cfg, processes, **kw)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="mnist-dist-launch-") as launch_dir:
        env[LAUNCH_DIR_ENV] = launch_dir
        proc = subprocess.Popen(cmd, env=env)
        with _forward_signals(proc, Path(launch_dir)):
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                proc.terminate()
                code = proc.wait()
        return PREEMPTED_EXIT if was_preempted(Path(launch_dir)) else code


@contextmanager
def _forward_signals(proc: subprocess.Popen, launch_dir: Path) -> Iterator[None]:
    """While the launch runs, pass SIGTERM/SIGUSR1 to the registered workers (before any has
    registered, SIGTERM to the launcher, which stops them: there is nothing to save yet)."""

    def forward(signum: int, frame: FrameType | None) -> None:
        pids = worker_pids(launch_dir)
        for pid, sig in [(pid, signum) for pid in pids] or [(proc.pid, signal.SIGTERM)]:
            with suppress(ProcessLookupError):  # already gone
                os.kill(pid, sig)

    previous = {sig: signal.signal(sig, forward) for sig in PreemptionWatch.SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
