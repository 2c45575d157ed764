"""Every environment variable the harness reads or sets, named once.

Ours are set by ``mnist_dist.launch`` for its ranks (or by a user); the others belong to torch's
launchers, Accelerate, SLURM and the XDG base-directory convention, and are only read.
"""

from __future__ import annotations

# ours
EXPECTED_WORLD = "MNIST_DIST_EXPECTED_WORLD"  # the world size the launcher started: ranks check it
LAUNCH_DIR = "MNIST_DIST_LAUNCH_DIR"  # per-launch folder: worker pids and the preempted marker
DATA_DIR = "MNIST_DATA_DIR"  # where MNIST lives when --data-dir is not given

# torch's launchers (torchrun, accelerate launch)
WORLD_SIZE = "WORLD_SIZE"
RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
USE_AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"  # "True": the elastic agent hosts the ranks' store
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"  # how often the agent has restarted its workers
SIGNALS_TO_HANDLE = "PET_SIGNALS_TO_HANDLE"  # torch >= 2.9: signals the elastic agent handles
LAUNCHER_VARS = (WORLD_SIZE, RANK, LOCAL_RANK)  # their presence means "this process is one rank"

# Accelerate
ACCELERATE_USE_CPU = "ACCELERATE_USE_CPU"

# CUDA
CUBLAS_WORKSPACE_CONFIG = "CUBLAS_WORKSPACE_CONFIG"  # cuBLAS is reproducible only with a fixed workspace

# SLURM
SLURM_JOB_ID = "SLURM_JOB_ID"
SLURM_ARRAY_JOB_ID = "SLURM_ARRAY_JOB_ID"
SLURM_ARRAY_TASK_ID = "SLURM_ARRAY_TASK_ID"

# XDG
XDG_CACHE_HOME = "XDG_CACHE_HOME"

# wandb (and the netrc file where `wandb login` keeps the key)
WANDB_MODE = "WANDB_MODE"
WANDB_BASE_URL = "WANDB_BASE_URL"
WANDB_API_KEY = "WANDB_API_KEY"
NETRC = "NETRC"

# Python
PYTHONUNBUFFERED = "PYTHONUNBUFFERED"  # the ranks' output reaches the terminal line by line
