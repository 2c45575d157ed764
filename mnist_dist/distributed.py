"""What the ranks of one run must agree on, decided in one place: rank 0's choices, the world size,
the weights every rank evaluates, the seeds of each rank's random streams, the kernels
``--deterministic`` allows and the device's name."""

from __future__ import annotations

import contextlib
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from mnist_dist import env
from mnist_dist.config import ConfigError

T = TypeVar("T")


def agree(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """Rank 0 runs ``decide``; every rank gets its result, or raises the exception it raised.
    For choices that must be made once (a folder, a checkpoint) and never diverge between ranks."""
    payload: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            payload[0] = decide()
        except Exception as e:  # raised below on every rank, rank 0 included
            payload[0] = e
    if accelerator.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    if isinstance(payload[0], Exception):
        raise payload[0]
    return payload[0]


def init_process_group() -> None:
    """Under torch's elastic agent (torchrun, ``accelerate launch``), start the ranks' process group
    in a key space of its own restart attempt, before Accelerate starts one.

    The agent's store outlives a restart (``--max-restarts``), and torch names the group's keys the
    same in every attempt: a restarted rank finds the addresses the failed attempt's ranks published
    (gloo's, NCCL's unique id) and connects to processes that are gone, while its new peers have not
    written theirs yet. Each attempt's own prefix (the agent's restart count) keeps them apart.
    """
    if os.environ.get(env.USE_AGENT_STORE) != str(True) or torch.distributed.is_initialized():
        return
    from torch.distributed.constants import default_pg_timeout

    agent_store = torch.distributed.TCPStore(
        os.environ[env.MASTER_ADDR], int(os.environ[env.MASTER_PORT]), is_master=False,
        timeout=default_pg_timeout,
    )  # fmt: skip
    attempt = os.environ.get(env.RESTART_COUNT, "0")
    torch.distributed.init_process_group(  # no backend: gloo for CPU tensors, NCCL for CUDA ones
        store=torch.distributed.PrefixStore(f"mnist_dist/attempt-{attempt}", agent_store),
        rank=int(os.environ[env.RANK]),
        world_size=int(os.environ[env.WORLD_SIZE]),
    )


def check_world_size(accelerator: Accelerator) -> None:
    """Fail loudly when the launcher started fewer ranks than were asked for."""
    asked = int(os.environ.get(env.EXPECTED_WORLD) or os.environ.get(env.WORLD_SIZE) or 1)
    if accelerator.num_processes != asked:
        raise RuntimeError(
            f"asked for {asked} processes but this run has world size {accelerator.num_processes} "
            f"({accelerator.distributed_type}); refusing to run fewer ranks than asked"
        )
    if (
        os.environ.get(env.ACCELERATE_USE_CPU)
        and env.WORLD_SIZE not in os.environ
        and env.MASTER_ADDR in os.environ
    ):
        warnings.warn(
            "`accelerate launch --cpu` starts ONE process whatever --num_processes says; for N CPU "
            "ranks use `mnist-dist train --processes N` or `accelerate launch --multi_gpu`",
            stacklevel=1,
        )


def set_threads(threads: int | None, accelerator: Accelerator) -> int:
    """On the CPU give each local rank an equal share of the cores (launchers set 1 thread otherwise)."""
    if accelerator.device.type != "cpu":
        return torch.get_num_threads()
    local = int(os.environ.get(env.LOCAL_WORLD_SIZE, accelerator.num_processes))
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(threads)
    return threads


def sync_from_rank0(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """Copy rank 0's parameters and buffers (BatchNorm statistics) to all ranks, so evaluation
    and the saved weights are the same model whatever the world size."""
    if accelerator.num_processes == 1:
        return
    for t in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(t.data, src=0)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank's own random streams (augmentation, dropout): distinct per rank."""
    return seed * 1_000 + rank


def restart_seed(seed: int, rank: int, step: int) -> int:
    """A rank's streams after a resume on another world size, where the saved streams do not apply."""
    return rank_seed(seed, rank) * 1_000_003 + step


CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the workspace sizes cuBLAS documents as reproducible


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """``--deterministic``: kernels that give the same result from the same inputs, every run.

    On the CPU an op without a deterministic kernel raises. On a GPU it only warns, naming itself:
    torch has no deterministic CUDA kernel for some ops (none on the harness's train or evaluation
    path), and a warning costs a cluster job less than a crash. cuBLAS needs a fixed workspace,
    read at its first call (the default is set here, before any), and cuDNN must not autotune.
    """
    if not deterministic:
        return
    cuda = device.type == "cuda"
    if cuda:
        workspace = os.environ.setdefault(env.CUBLAS_WORKSPACE_CONFIG, CUBLAS_DETERMINISTIC[0])
        if workspace not in CUBLAS_DETERMINISTIC:
            raise ConfigError(
                f"--deterministic on a GPU needs {env.CUBLAS_WORKSPACE_CONFIG} unset or one of "
                f"{', '.join(CUBLAS_DETERMINISTIC)}; got {workspace!r}"
            )
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=cuda)


def use_cpu(forced: bool, cuda: bool | None = None, mps: bool | None = None) -> bool:
    """Accelerate's ``cpu`` flag: a CUDA GPU, else Apple's MPS (Accelerate's own choice when neither
    is forced off), else the CPU. Also True on a CPU-only machine: otherwise gloo ranks started by a
    GPU launcher each believe they are alone. ``cuda``/``mps``: what is present (default: ask torch)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    mps = torch.backends.mps.is_available() if mps is None else mps
    return forced or not (cuda or mps)


def local_device() -> torch.device:
    """Where a single-process command (evaluate, predict, bench) computes: where training would."""
    if use_cpu(False):
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "mps")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores)"
