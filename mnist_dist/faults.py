"""The faults a run detects and stops on by itself, each with its own exit code, so that a job script
can tell them from a crash (1), a refused option (2) or a preemption (75):

    WRITE_FAILED_EXIT  a file of the run could not be written (full disk, I/O error, permission)
    DIVERGED_EXIT      the train loss or the weights became NaN or inf

Either way the newest checkpoint is left intact, nothing written after the fault is taken for valid,
and the message (one line) says what to do next.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

WRITE_FAILED_EXIT = 74  # EX_IOERR (sysexits.h)
DIVERGED_EXIT = 65  # EX_DATAERR (sysexits.h): the recipe's numbers made the training diverge

# What a failed write raises: OSError from Python's own files, RuntimeError from torch.save (on a full
# disk it reports only a stream position), SafetensorError from safetensors.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class Fault(Exception):
    """A fault the run stopped on; ``str()`` is the one line for the user. Built from that line alone,
    so it pickles: rank 0's fault reaches the other ranks through a broadcast."""

    exit_code = 1


class WriteFailed(Fault):
    exit_code = WRITE_FAILED_EXIT


class Diverged(Fault):
    exit_code = DIVERGED_EXIT


def write_failed(path: Path, error: BaseException, then: str) -> WriteFailed:
    """The fault for ``error`` raised while writing ``path`` (the file the OS names, when it does),
    followed by ``then``: what is intact and how to continue."""
    if isinstance(error, OSError) and error.errno is not None:
        path = Path(error.filename or path)
        reason = f"{error.strerror} ({errno.errorcode.get(error.errno, error.errno)})"
    else:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = f"{lines[0] if lines else type(error).__name__}; {_free_space(path)}"
    return WriteFailed(f"cannot write {path}: {reason}; {then} (exit code {WRITE_FAILED_EXIT})")


@contextmanager
def writing(path: Path, then: str) -> Iterator[None]:
    """Turn a failed write inside the block into ``write_failed(path, ..., then)``."""
    try:
        yield
    except WRITE_ERRORS as e:
        raise write_failed(path, e, then) from None


def _free_space(path: Path) -> str:
    """The free space where ``path`` is written: what tells a full disk from torch's stream errors."""
    folder = next((p for p in Path(path).absolute().parents if p.is_dir()), Path("/"))
    return f"{shutil.disk_usage(folder).free:,} bytes free in {folder}"


def raise_first(accelerator: Accelerator, fault: Exception | None) -> None:
    """Collective: every rank raises the fault of the lowest rank that had one, or none does. For
    work every rank does on its own (writing its files), so that no rank waits for one that stopped."""
    faults = [fault]
    if accelerator.num_processes > 1:
        faults = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(faults, fault)
    first = next((f for f in faults if f is not None), None)
    if first is not None:
        raise first
