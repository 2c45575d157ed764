"""Faults injected into in-process runs on synthetic digits: writes that fail part-way (a full disk,
an I/O error, a refused permission, a process killed mid-write, a real full tmpfs) and a training
whose loss or weights turn NaN or inf. Each run must stop with its own exit code and one line, keep
its newest checkpoint valid, never leave a file that passes for complete, and ``--resume auto`` must
end with the weights of a run that never failed."""

from __future__ import annotations

import errno
import functools
import math
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from safetensors import SafetensorError
from safetensors.torch import load_file

from mnist_dist import checkpoint, files, runfiles
from mnist_dist import checkpoint_format as fmt
from mnist_dist import trainer as T
from mnist_dist.cli import _train_or_fail
from mnist_dist.data import MNISTArrays
from mnist_dist.faults import DIVERGED_EXIT, WRITE_FAILED_EXIT, Diverged, WriteFailed

from .test_trainer import config, records, run, weights

# 2 epochs of 8 steps; step checkpoints at 5, 10 and 15, epoch checkpoints at 8 and 16; logs every 3.
OPTIONS = {"log_every": 3, "checkpoint_every": 5}
# What safetensors raises when the disk fills (measured on a full tmpfs).
FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"


class Killed(BaseException):
    """The process dies here, as under SIGKILL: no handler runs, nothing is cleaned up."""


class FailOn:
    """Wraps a writing function: its ``nth`` call whose path arguments contain ``name`` raises
    ``error(path)`` instead, as a full disk or a failing device would; other calls go through."""

    def __init__(
        self, target: Callable[..., Any], name: str, error: Callable[[str], BaseException], nth: int = 1
    ):
        self.target, self.name, self.error, self.nth, self.calls = target, name, error, nth, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        path = next((str(a) for a in args if isinstance(a, str | Path) and self.name in str(a)), None)
        if path is not None:
            self.calls += 1
            if self.calls == self.nth:
                raise self.error(path)
        return self.target(*args, **kwargs)


def os_error(code: int) -> Callable[[str], OSError]:
    return lambda path: OSError(code, os.strerror(code), path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, digits: MNISTArrays) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("ref")
    run(out, "ref", digits, **OPTIONS)
    return weights(out / "ref")


def assert_stopped_cleanly(run_dir: Path, newest: int, *, leftovers: bool = False) -> None:
    """The newest checkpoint that verifies is ``newest``'s and its weights are finite; no final files
    and (unless a kill left them) no temporary files remain."""
    latest = fmt.find_latest(run_dir / "checkpoints")
    assert latest is not None and fmt.step_of(latest) == newest
    assert fmt.step_of(fmt.candidates(run_dir / "checkpoints")[0]) == newest  # no later folder
    assert all(torch.isfinite(t).all() for t in load_file(str(latest / "model.safetensors")).values())
    assert not (run_dir / runfiles.WEIGHTS_FILE).exists() and not (run_dir / runfiles.SUMMARY_FILE).exists()
    temporary = [p.name for p in run_dir.rglob("*") if p.name.startswith(".")]
    assert bool(temporary) == leftovers, temporary


def assert_resumes_to(tmp: Path, name: str, digits: MNISTArrays, expected: dict[str, torch.Tensor]) -> None:
    run(tmp, name, digits, resume="auto", **OPTIONS)
    final = weights(tmp / name)
    assert all(torch.equal(final[k], expected[k]) for k in expected), "resumed weights differ"
    assert (tmp / name / runfiles.SUMMARY_FILE).is_file()


# ---------------------------------------------------------------------- write failures
CHECKPOINT_FAULTS = {
    # the rank's own file, written after accelerate's: the folder is half full
    "rank-file-ENOSPC": (checkpoint, "save_file", "rank_0", lambda p: SafetensorError(FULL_DISK), "rank_0"),
    # trainer_state.json: the disk reports the error when the file is flushed
    "state-EIO": (files, "fsync_paths", "trainer_state", os_error(errno.EIO), "Input/output error (EIO)"),
    # the manifest, the last file: everything else is complete
    "manifest-EACCES": (files, "fsync_paths", fmt.MANIFEST, os_error(errno.EACCES), "Permission denied"),
}


@pytest.mark.parametrize("fault", list(CHECKPOINT_FAULTS))
def test_a_checkpoint_that_fails_part_way_leaves_the_last_one_to_resume_from(
    tmp_path: Path, digits: MNISTArrays, monkeypatch: pytest.MonkeyPatch, uninterrupted: dict, fault: str
) -> None:
    module, attr, name, error, says = CHECKPOINT_FAULTS[fault]
    monkeypatch.setattr(module, attr, FailOn(getattr(module, attr), name, error, nth=3))  # step 10's
    with pytest.raises(WriteFailed) as stopped:
        run(tmp_path, "f", digits, **OPTIONS)
    message = str(stopped.value)
    assert stopped.value.exit_code == WRITE_FAILED_EXIT and "\n" not in message
    assert ".tmp-step-00000010" in message and says in message, message
    assert "step-00000008 is intact" in message and "--resume auto" in message, message
    assert max(r["step"] for r in records(tmp_path / "f", "step")) == 9
    assert_stopped_cleanly(tmp_path / "f", newest=8)
    if fault == "rank-file-ENOSPC":  # every fault leaves the folder as checked above: resume from one
        monkeypatch.undo()
        assert_resumes_to(tmp_path, "f", digits, uninterrupted)


def test_a_checkpoint_killed_mid_write_is_never_taken_for_one(
    tmp_path: Path, digits: MNISTArrays, monkeypatch: pytest.MonkeyPatch, uninterrupted: dict
) -> None:
    """Killed while sealing step 10's folder (every file written, the manifest not): the folder stays
    behind, and `--resume auto` skips it for step 8's."""
    kill = FailOn(files.fsync_paths, fmt.MANIFEST, lambda p: Killed(), nth=3)
    monkeypatch.setattr(files, "fsync_paths", kill)
    with pytest.raises(Killed):
        run(tmp_path, "k", digits, **OPTIONS)
    left = tmp_path / "k" / "checkpoints" / ".tmp-step-00000010"
    assert (left / "model.safetensors").is_file() and not (left / fmt.MANIFEST).exists()
    assert_stopped_cleanly(tmp_path / "k", newest=8, leftovers=True)
    monkeypatch.undo()
    assert_resumes_to(tmp_path, "k", digits, uninterrupted)


FINAL_FAULTS = {
    "model.safetensors": ("safetensors.torch.save_file", lambda p: SafetensorError(FULL_DISK), "bytes free"),
    "summary.json": ("mnist_dist.files.fsync_paths", os_error(errno.ENOSPC), "No space left on device"),
}


@pytest.mark.parametrize("target", list(FINAL_FAULTS))
def test_a_failed_final_save_resumes_to_the_final_files(
    tmp_path: Path, digits: MNISTArrays, monkeypatch: pytest.MonkeyPatch, uninterrupted: dict, target: str
) -> None:
    where, error, says = FINAL_FAULTS[target]
    module_name, attr = where.rsplit(".", 1)
    module = __import__(module_name, fromlist=[attr])
    monkeypatch.setattr(module, attr, FailOn(getattr(module, attr), target, error))
    with pytest.raises(WriteFailed) as stopped:
        run(tmp_path, "z", digits, **OPTIONS)
    message = str(stopped.value)
    assert f"cannot write {tmp_path / 'z'}" in message and target in message and says in message, message
    assert "step-00000016, is intact" in message, message
    assert not (tmp_path / "z" / runfiles.SUMMARY_FILE).exists()
    assert (tmp_path / "z" / runfiles.WEIGHTS_FILE).exists() == (target == "summary.json")
    assert not [p for p in (tmp_path / "z").rglob(".*")], "a temporary file was left"
    assert fmt.step_of(fmt.find_latest(tmp_path / "z" / "checkpoints")) == 16
    if target == "model.safetensors":  # the other leaves a complete model.safetensors, which is rewritten
        monkeypatch.undo()
        assert_resumes_to(tmp_path, "z", digits, uninterrupted)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs (needs root; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


class FillDiskAt(T.Hooks):
    """Just before ``step``, another writer fills the disk to its last byte."""

    def __init__(self, disk: Path, step: int) -> None:
        self.filler, self.step = disk / "filler", step

    def on_step(self, trainer: T.Trainer, micro_batches: list[torch.Tensor]) -> None:
        if trainer.state.global_step + 1 == self.step:
            with open(self.filler, "wb") as f, pytest.raises(OSError, match="No space left"):
                while True:
                    f.write(bytes(1 << 16))
                    f.flush()


def test_a_real_full_disk_stops_the_run_and_resume_continues(
    small_disk: Path, digits: MNISTArrays, uninterrupted: dict
) -> None:
    with pytest.raises(WriteFailed) as stopped:
        run(small_disk, "d", digits, FillDiskAt(small_disk, 10), **OPTIONS)
    message = str(stopped.value)
    assert ".tmp-step-00000010" in message and "No space left on device" in message, message
    assert_stopped_cleanly(small_disk / "d", newest=8)
    (small_disk / "filler").unlink()  # the user frees space
    assert_resumes_to(small_disk, "d", digits, uninterrupted)


# ---------------------------------------------------------------------- non-finite loss
class Poison(T.Hooks):
    """Just before ``step``: one weight (or, with ``optimizer``, Adam's running mean of its gradient,
    so the step's loss is still finite but the weights it writes are not) becomes ``value``."""

    def __init__(self, step: int, value: float = math.nan, optimizer: bool = False) -> None:
        self.step, self.value, self.optimizer = step, value, optimizer

    def on_step(self, trainer: T.Trainer, micro_batches: list[torch.Tensor]) -> None:
        if trainer.state.global_step + 1 == self.step:
            weight = next(trainer.net.parameters())
            target = trainer.optimizer.state[weight]["exp_avg"] if self.optimizer else weight
            with torch.no_grad():
                target[(0,) * target.dim()] = self.value  # any memory format


@pytest.mark.parametrize(
    ("poison", "checkpoint_every", "says"),
    [
        (Poison(10), 0, "the train loss became NaN or inf in steps 10-12 (epoch 2,"),  # at the log
        (Poison(10, math.inf), 5, "the train loss became NaN or inf in steps 10-10 (epoch 2,"),  # checkpoint
        (Poison(10, optimizer=True), 5, "the weights became NaN or inf in steps 10-10 (epoch 2,"),
        (Poison(7), 0, "the train loss became NaN or inf in steps 7-8 (epoch 1,"),  # at the epoch's end
    ],
    ids=["nan-weight-at-log", "inf-weight-before-checkpoint", "nan-update-before-checkpoint", "epoch-end"],
)
def test_a_non_finite_loss_stops_before_anything_is_saved_from_it(
    tmp_path: Path, digits: MNISTArrays, poison: Poison, checkpoint_every: int, says: str
) -> None:
    with pytest.raises(Diverged) as stopped:
        run(tmp_path, "n", digits, poison, log_every=3, checkpoint_every=checkpoint_every)
    message = str(stopped.value)
    assert stopped.value.exit_code == DIVERGED_EXIT and "\n" not in message
    assert says in message and ", lr " in message and "--max-lr" in message, message
    newest = 8 if poison.step > 8 else None
    if newest is None:
        assert not (tmp_path / "n" / "checkpoints").exists() and "no checkpoint was written" in message
    else:
        assert_stopped_cleanly(tmp_path / "n", newest=newest)
        assert f"newest checkpoint: {tmp_path / 'n' / 'checkpoints' / 'step-00000008'}" in message
    logged = records(tmp_path / "n", "step") + records(tmp_path / "n", "epoch")
    assert all(math.isfinite(v) for r in logged for v in r.values() if isinstance(v, float)), logged


def test_a_huge_learning_rate_stops_with_no_nan_weights_written(tmp_path: Path, digits: MNISTArrays) -> None:
    """The issue's `--max-lr 1e30`, which used to train on NaN to the end and save NaN weights. (Adam
    with batch norm rides out `--lr 1e3` on these digits: its losses stay finite.)"""
    with pytest.raises(Diverged) as stopped:
        run(tmp_path, "lr", digits, lr=1e30, max_lr=1e30, log_every=2, checkpoint_every=2)
    assert "the train loss became NaN or inf in steps 1-2 (epoch 1, lr " in str(stopped.value), stopped.value
    run_dir = tmp_path / "lr"
    assert not (run_dir / runfiles.WEIGHTS_FILE).exists() and not (run_dir / runfiles.SUMMARY_FILE).exists()
    assert not (run_dir / "checkpoints").exists() and not records(run_dir, "step")


# ---------------------------------------------------------------------- what the command says
class Metrics(runfiles.MetricsLog):
    """metrics.jsonl on a disk that fills after the first log line."""

    def write(self, record: dict[str, Any]) -> None:
        if record.get("step", 0) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._file.name))
        super().write(record)


@pytest.mark.parametrize(
    ("fault", "code", "says"),
    [
        ("diverged", DIVERGED_EXIT, "Error: the train loss became NaN or inf in steps 10-12"),
        ("checkpoint", WRITE_FAILED_EXIT, "Error: cannot write "),
        ("metrics", WRITE_FAILED_EXIT, "metrics.jsonl: No space left on device (ENOSPC)"),
    ],
    ids=["diverged", "checkpoint", "metrics"],
)
def test_the_command_says_one_line_and_exits_with_the_faults_code(
    tmp_path: Path,
    digits: MNISTArrays,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fault: str,
    code: int,
    says: str,
) -> None:
    hooks: tuple[T.Hooks, ...] = (Poison(10),) if fault == "diverged" else ()
    if fault == "checkpoint":
        monkeypatch.setattr(
            checkpoint, "save_file", FailOn(checkpoint.save_file, "rank_0", os_error(errno.ENOSPC))
        )
    if fault == "metrics":
        monkeypatch.setattr(runfiles, "MetricsLog", Metrics)
    monkeypatch.setattr(T, "train", functools.partial(T.train, data=digits))
    with pytest.raises(typer.Exit) as exited:
        _train_or_fail(config(tmp_path, "c", log_every=3), hooks)
    assert exited.value.exit_code == code
    errors = [line for line in capsys.readouterr().err.splitlines() if "Error" in line or "Traceback" in line]
    assert len(errors) == 1 and says in errors[0], errors
