"""Shared test helpers. Tests use the real MNIST files: $MNIST_DATA_DIR (CI points it at
../shared/data), else the user cache, where `mnist-dist download` puts them once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_dist import data as D
from mnist_dist.config import default_data_dir


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = default_data_dir()
    if D.missing_files(root):
        try:  # a user's machine: downloaded once into the cache
            D.download(root)
        except D.DataError as e:
            pytest.fail(f"the tests need MNIST: {e}")
    return root


@pytest.fixture(scope="session")
def mnist(data_root: Path) -> D.MNISTArrays:
    return D.load_mnist(data_root, allow_download=False)


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run `mnist-dist ARGS` as a real process (wandb off unless the test says otherwise)."""
    full_env = {"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **os.environ, **(env or {})}
    for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        full_env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "mnist_dist.cli", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
