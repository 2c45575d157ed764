"""Start N training ranks (on one or several nodes) through Accelerate's launcher.

On a CPU machine ``accelerate launch --cpu --num_processes N`` starts ONE process (GUIDE pitfall
4); ``--multi_gpu`` starts N real ranks through torch's elastic agent, and the ranks pick gloo
because ``make_accelerator`` passes ``cpu=True`` without a GPU. Each rank checks that it really has
the world size asked for (``MNIST_DIST_EXPECTED_WORLD``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import fields

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
    """Run the ranks to completion; a crash in any rank ends the whole launch with its code."""
    nodes = int(kw.get("nodes", 1))  # type: ignore[arg-type]
    env = dict(os.environ)
    env[EXPECTED_WORLD_ENV] = str(processes * nodes)
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = launch_command(cfg, processes, **kw)  # type: ignore[arg-type]
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
