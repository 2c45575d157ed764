"""Checkpoints and exact resume, end to end with 2 real CPU ranks on MNIST.

    pytest tests/test_checkpoint.py      # a few minutes on 2 CPU cores; needs MNIST (MNIST_DATA_DIR)

A 2-process run is stopped with SIGTERM in the middle of its second epoch and continued with
--resume auto: its final weights and metrics equal those of an uninterrupted run, bit for bit.
Its real checkpoints are then damaged on purpose: a truncated or unfinished one is skipped, a
modified file is refused, a pickle that would run code is refused without running (also by the real
resume, with exit code 2), and a resume on another number of processes finishes the run. The same
rules on hand-made folders, in-process, are tests/test_checkpoint_format.py.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mnist_dist import checkpoint_format as fmt
from mnist_dist import data as D
from mnist_dist.config import default_data_dir
from mnist_dist.preemption import PREEMPTED_EXIT

from .helpers import RunsCode, started

pytestmark = [
    pytest.mark.proof,
    pytest.mark.skipif(
        bool(D.missing_files(default_data_dir())), reason="MNIST not found (set MNIST_DATA_DIR)"
    ),
]
TINY = ("--max-train-samples", "1024", "--epochs", "2", "--wandb", "disabled", "--deterministic")
STEPS = 8  # 1024 samples / (2 processes x 128) = 4 steps per epoch, 2 epochs
RESULT_KEYS = (
    "val_acc",
    "val_loss",
    "val_count",
    "test_acc",
    "test_loss",
    "test_count",
    "best_val_acc",
    "steps",
)
EPOCH_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_count", "lr")
STEP_KEYS = ("step", "train/loss", "lr")
TIMEOUT = 400


def train_cmd(tmp: Path, name: str, *extra: str, processes: int = 2) -> list[str]:
    return [
        *(sys.executable, "-m", "mnist_dist.cli", "train", "--output-dir", str(tmp / "runs")),
        *("--name", name, "--processes", str(processes), "--log-every", "2", *TINY, *extra),
    ]


def run(cmd: list[str], tmp: Path, log: Path) -> int:
    with started(cmd, tmp, log) as proc:
        return proc.wait(timeout=TIMEOUT)


def wait_for(path: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert proc.poll() is None, (
            f"run ended ({proc.returncode}) before {path} appeared:\n{log.read_text()}"
        )
        assert time.monotonic() < deadline, f"{path} did not appear in {TIMEOUT} s"
        time.sleep(0.05)


@dataclass
class Runs:
    tmp: Path
    ref: Path  # uninterrupted
    cut: Path  # stopped by SIGTERM, then resumed
    stopped_code: int
    stopped_log: str
    resumed_code: int
    resumed_log: str
    snapshot: Path  # the cut run's checkpoints as the SIGTERM left them


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    tmp = tmp_path_factory.mktemp("checkpoint")
    assert run(train_cmd(tmp, "ref"), tmp, tmp / "ref.log") == 0, (tmp / "ref.log").read_text()
    cut = train_cmd(tmp, "cut", "--checkpoint-every", "3")
    with started(cut, tmp, tmp / "stopped.log") as proc:
        # Epoch 1 is done and checkpointed: the SIGTERM lands in epoch 2. It goes to the parent
        # `mnist-dist train` only, which must pass it on to the ranks.
        wait_for(tmp / "runs/cut/checkpoints/step-00000004", proc, tmp / "stopped.log")
        proc.send_signal(signal.SIGTERM)
        stopped = proc.wait(timeout=TIMEOUT)
    shutil.copytree(tmp / "runs/cut/checkpoints", tmp / "snapshot")
    resumed = run([*cut, "--resume", "auto"], tmp, tmp / "resumed.log")
    return Runs(
        tmp,
        tmp / "runs/ref",
        tmp / "runs/cut",
        stopped,
        (tmp / "stopped.log").read_text(),
        resumed,
        (tmp / "resumed.log").read_text(),
        tmp / "snapshot",
    )


def test_sigterm_stops_all_ranks_at_a_checkpoint_with_exit_75(runs: Runs) -> None:
    assert runs.stopped_code == PREEMPTED_EXIT, runs.stopped_log
    assert "stopped by SIGTERM" in runs.stopped_log
    newest, older = fmt.candidates(runs.snapshot)  # --keep-checkpoints 2 (the default) pruned the rest
    manifest = fmt.verify(newest)
    assert manifest["reason"] == "preempted"
    assert manifest["world_size"] == 2
    assert manifest["epoch"] == 1 and 1 <= manifest["step_in_epoch"] <= 4  # in epoch 2, before its end
    assert set(manifest["files"]) >= {"random_states_0.pkl", "random_states_1.pkl", "rank_1.safetensors"}
    assert fmt.step_of(older) < manifest["global_step"]
    assert not list(runs.snapshot.glob(".tmp-*"))


def test_resumed_run_equals_the_uninterrupted_run(runs: Runs) -> None:
    assert runs.resumed_code == 0, runs.resumed_log
    newest = fmt.candidates(runs.snapshot)[0]
    assert f"resumed from {runs.cut / 'checkpoints' / newest.name}" in runs.resumed_log
    ref, cut = load_file(str(runs.ref / "model.safetensors")), load_file(str(runs.cut / "model.safetensors"))
    assert ref.keys() == cut.keys()
    assert all(torch.equal(ref[k], cut[k]) for k in ref), "final weights differ"
    ref_summary = json.loads((runs.ref / "summary.json").read_text())
    cut_summary = json.loads((runs.cut / "summary.json").read_text())
    assert {k: cut_summary[k] for k in RESULT_KEYS} == {k: ref_summary[k] for k in RESULT_KEYS}
    assert ref_summary["steps"] == STEPS
    # Every epoch and step record once, with the same values (the epoch-2 train loss and accuracy
    # sum over the steps before and after the stop).
    assert records(runs.cut) == records(runs.ref)


def records(run_dir: Path) -> list[tuple]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        keys = {"epoch": EPOCH_KEYS, "step": STEP_KEYS}.get(r.get("kind"), ())
        out.append((r.get("kind"), *(r[k] for k in keys)))
    return out


def test_truncated_or_unfinished_checkpoints_are_skipped(
    runs: Runs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(runs.snapshot, ckpts)
    newest, older = fmt.candidates(ckpts)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # A crash mid-write leaves a .tmp- folder (never a candidate); one renamed without its manifest
    # (impossible by the protocol, but e.g. a partial copy) does not count either.
    shutil.copytree(older, ckpts / ".tmp-step-00000099")
    shutil.copytree(older, ckpts / "step-00000098")
    (ckpts / "step-00000098" / fmt.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger=fmt.__name__):
        assert fmt.find_latest(ckpts) == older
    assert "step-00000098 has no checkpoint.json" in caplog.text
    assert f"{weights} is truncated or altered" in caplog.text
    older.joinpath("trainer_state.json").write_text("{}")
    assert fmt.find_latest(ckpts) is None


def test_a_modified_file_is_refused(runs: Runs, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(fmt.candidates(runs.snapshot)[0], ckpt)
    blob = bytearray((ckpt / "optimizer.bin").read_bytes())
    blob[-100] ^= 0xFF  # same size, one byte changed
    (ckpt / "optimizer.bin").write_bytes(bytes(blob))
    with pytest.raises(fmt.CheckpointError, match=r"optimizer\.bin changed after it was written"):
        fmt.verify(ckpt)
    with pytest.raises(fmt.CheckpointError, match="not a mnist-dist checkpoint"):
        fmt.verify(tmp_path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the raw pickle below
def test_a_pickle_that_runs_code_is_refused_without_running(runs: Runs, tmp_path: Path) -> None:
    forged = tmp_path / "forged"
    shutil.copytree(fmt.candidates(runs.snapshot)[0], forged)
    sentinel = tmp_path / "code-ran"
    torch.save({"state": RunsCode(sentinel)}, forged / "optimizer.bin")  # as a torch.save'd state
    (forged / "random_states_0.pkl").write_bytes(pickle.dumps({"state": RunsCode(sentinel)}))  # raw
    # The forger also rewrote the manifest, so only the safe loader stands in the way.
    manifest = json.loads((forged / fmt.MANIFEST).read_text())
    for name, meta in manifest["files"].items():
        meta.update(bytes=(forged / name).stat().st_size, sha256=fmt.sha256_file(forged / name))
    (forged / fmt.MANIFEST).write_text(json.dumps(manifest))
    for name in ("optimizer.bin", "random_states_0.pkl"):
        with pytest.raises(fmt.CheckpointError, match=rf"{name} does not load without running code"):
            fmt.safe_torch_load(forged / name)
    assert not sentinel.exists(), "unpickling ran code"
    # The real resume path, one process (global batch kept at 2 x 128):
    tmp = runs.tmp
    cmd = train_cmd(tmp, "forged", "--resume", str(forged), "--global-batch-size", "256", processes=1)
    code = run(cmd, tmp, tmp_path / "forged.log")
    log = (tmp_path / "forged.log").read_text()
    assert code == 2, log
    assert "optimizer.bin does not load without running code" in log
    assert "posix.system" in log
    assert not sentinel.exists(), "unpickling ran code"


def test_resume_on_another_number_of_processes_finishes_the_run(runs: Runs, tmp_path: Path) -> None:
    """2 processes x 128 before the stop, 1 process x 256 after: same steps, same schedule."""
    tmp = runs.tmp
    ckpt = fmt.candidates(runs.snapshot)[0]
    cmd = train_cmd(tmp, "one", "--resume", str(ckpt), "--global-batch-size", "256", processes=1)
    code = run(cmd, tmp, tmp_path / "one.log")
    assert code == 0, (tmp_path / "one.log").read_text()
    summary = json.loads((tmp / "runs/one/summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == STEPS
    last = json.loads((fmt.candidates(tmp / "runs/one/checkpoints")[0] / fmt.STATE).read_text())
    history = last["state"]["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    ref_epoch1 = next(r for r in records(runs.ref) if r[0] == "epoch")
    assert ("epoch", *(history[0][k] for k in EPOCH_KEYS)) == ref_epoch1  # carried over unchanged
