"""A lost rank, restarted: torch's elastic agent (``torchrun --max-restarts``, ``mnist-dist train
--max-restarts``) restarts the group, the ranks resume from the newest checkpoint and end with the
weights of a run that never lost one, bit for bit; the launcher's exit codes and messages.

The proofs start real 2-rank gloo runs on a slice of real MNIST, one thread per rank, and SIGKILL
rank 1 while it trains; the fast tests check the launch folder and the refusals in-process."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mnist_dist import env, preemption
from mnist_dist.cli import app
from mnist_dist.config import from_preset
from mnist_dist.faults import DIVERGED_EXIT
from mnist_dist.launch import CONFIG_FILE, launch_command

from .helpers import REPO, clean_env, free_port, rank_pid, started

# 2 ranks x 64 = 128 per step: 16 steps per epoch, a step checkpoint every 4 steps
RECIPE = ("--preset", "reference", "--max-train-samples", "2048", "--epochs", "2", "--batch-size", "64",
          "--threads", "1", "--log-every", "1", "--wandb", "disabled")  # fmt: skip
CHECKPOINTS = ("--checkpoint-every", "4")
TRAIN = [sys.executable, "-m", "mnist_dist.cli", "train"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
ANNOUNCE = "process(es) on"  # in the line each (re)started group's rank 0 prints first


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the weights differ from the uninterrupted run's"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, torch.Tensor]:
    """The uninterrupted run every restarted one must end equal to (2 ranks, same recipe)."""
    out = tmp_path_factory.mktemp("restart-ref")
    done = subprocess.run(
        [*TRAIN, *RECIPE, *CHECKPOINTS, "--processes", "2", "--output-dir", str(out), "--name", "ref"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return weights(out / "ref")


def wait_for(ready: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"ended before the kill ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return sum('"kind": "step"' in line for line in lines)


def kill_rank_1_and_finish(cmd: list[str], tmp_path: Path, ready: Callable[[Path], bool]) -> str:
    """Run ``cmd`` (a 2-rank training of run ``tmp_path/runs/r``), SIGKILL rank 1 once ``ready(run
    folder)``, and return the whole output once the command has ended by itself."""
    run_dir, log = tmp_path / "runs" / "r", tmp_path / "log"
    with started(cmd, tmp_path, log) as proc:
        wait_for(lambda: ready(run_dir), proc, log)
        os.kill(rank_pid(str(tmp_path / "tmp"), 1), signal.SIGKILL)
        code = proc.wait(timeout=300)
    output = log.read_text()
    assert code == 0, output[-4000:]
    assert output.count(ANNOUNCE) == 2, output[-4000:]  # the group started twice
    return output


def step_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "step-00000004").is_dir()


def torchrun(tmp_path: Path, *args: str) -> list[str]:
    return [*TORCHRUN, "--master_port", str(free_port()), *args, "-m", "mnist_dist.train", *RECIPE,
            "--output-dir", str(tmp_path / "runs"), "--name", "r", "--resume", "auto"]  # fmt: skip


def mnist_dist_train(tmp_path: Path, *args: str) -> list[str]:
    return [*TRAIN, *RECIPE, "--processes", "2", "--output-dir", str(tmp_path / "runs"), "--name", "r",
            "--resume", "auto", *args]  # fmt: skip


# ---------------------------------------------------------------------- proofs: real processes
@pytest.mark.proof
def test_torchrun_restarts_a_rank_killed_mid_epoch_and_ends_with_the_uninterrupted_weights(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    """The issue's report: the restarted group used to read the failed group's addresses from the
    agent's store and fail or hang instead of resuming."""
    cmd = [*torchrun(tmp_path, "--max_restarts", "1"), *CHECKPOINTS]
    output = kill_rank_1_and_finish(cmd, tmp_path, step_checkpoint)
    assert "resumed from" in output and "checkpoints/step-" in output
    assert_same_weights(weights(tmp_path / "runs" / "r"), reference)


@pytest.mark.proof
def test_mnist_dist_train_max_restarts_restarts_a_killed_rank_to_the_same_weights(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    output = kill_rank_1_and_finish(
        mnist_dist_train(tmp_path, "--max-restarts", "1", *CHECKPOINTS), tmp_path, step_checkpoint
    )
    assert "resumed from" in output
    assert_same_weights(weights(tmp_path / "runs" / "r"), reference)


@pytest.mark.proof
def test_a_restart_before_any_checkpoint_starts_over_to_the_same_weights(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    """Killed after 2 logged steps of epoch 1, with no step checkpoints: nothing to resume from."""
    cmd = torchrun(tmp_path, "--max_restarts", "1")
    output = kill_rank_1_and_finish(cmd, tmp_path, lambda run_dir: logged_steps(run_dir) >= 2)
    assert output.count("no checkpoint to resume from yet: starting from step 0") == 2, output[-4000:]
    assert_same_weights(weights(tmp_path / "runs" / "r"), reference)


INJECTED = "injected: rank 1 fails at every start"
FAILING_RANK = f"""
import os
if os.environ.get("{env.RANK}") == "1":  # the ranks only: the launcher and the agent have no RANK
    from mnist_dist.trainer import Trainer

    def fail(self, *args, **kwargs):
        raise RuntimeError("{INJECTED}")

    Trainer.train_step = fail
"""


@pytest.mark.proof
def test_a_rank_that_keeps_failing_stops_after_k_restarts_with_the_cause_in_one_line(tmp_path: Path) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAILING_RANK)  # every Python process of the run runs it
    done = subprocess.run(
        mnist_dist_train(tmp_path, "--max-restarts", "2"), cwd=REPO, capture_output=True, text=True,
        timeout=300, env=clean_env(PYTHONPATH=f"{inject}:{REPO}"),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-4000:]
    assert done.stdout.count(ANNOUNCE) + done.stderr.count(ANNOUNCE) == 3  # the first start and 2 restarts
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"Error: training failed after 2 restarts: rank 1: RuntimeError: {INJECTED}", last


@pytest.mark.proof
def test_a_fault_in_the_ranks_is_the_launchers_exit_code_and_is_not_restarted(tmp_path: Path) -> None:
    """--lr 1e30 diverges on every rank: 65 (not the agent's 1), one line, no restart."""
    done = subprocess.run(
        mnist_dist_train(tmp_path, "--max-restarts", "1", "--lr", "1e30", "--max-lr", "1e30"),
        cwd=REPO, capture_output=True, text=True, timeout=300, env=clean_env(),
    )  # fmt: skip
    assert done.returncode == DIVERGED_EXIT, done.stderr[-4000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "became NaN or inf" in errors[0], done.stderr[-4000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert (done.stdout + done.stderr).count(ANNOUNCE) == 1  # not restarted
    assert not (tmp_path / "runs" / "r" / "model.safetensors").exists()


RESTARTED_LATE = """
import os, time
import torch
from mnist_dist.distributed import init_process_group
attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == 1:
    time.sleep(6)  # rank 0 of the new group looks for rank 1's address first
init_process_group()
if attempt == 0 and rank == 1:
    time.sleep(1)
    os._exit(9)  # dies after the group has formed
t = torch.ones(1)
torch.distributed.all_reduce(t)  # in the failed attempt, rank 0 fails here
os.write(1, f"attempt {attempt} rank {rank} sum {t.item():.0f}\\n".encode())  # one write: lines never interleave
torch.distributed.destroy_process_group()  # as the trainer does: exiting with gloo's threads running may abort
"""


@pytest.mark.proof
def test_a_restarted_group_never_connects_to_the_failed_groups_addresses(tmp_path: Path) -> None:
    """The cause of the issue's hang, alone: torch's process group keys are the same in every
    attempt and the agent's store keeps them, so without a prefix of its own restart attempt, the
    new rank 0 reads the dead rank 1's address ("Connection refused")."""
    script = tmp_path / "late.py"
    script.write_text(RESTARTED_LATE)
    done = subprocess.run(
        [*TORCHRUN, "--max_restarts", "1", "--master_port", str(free_port()), str(script)],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=clean_env(PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"attempt 1 rank 0 sum 2", "attempt 1 rank 1 sum 2"} <= set(done.stdout.splitlines()), done.stdout


# ---------------------------------------------------------------------- fast: in-process
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--processes", "2", "--max-restarts", "1"], "--max-restarts 1 restarts the ranks from the run's "
         "newest checkpoint: it needs --resume auto (got no --resume)"),
        (["--processes", "2", "--max-restarts", "2", "--resume", "{ckpt}"], "it needs --resume auto (got "
         "--resume {ckpt})"),
        (["--max-restarts", "1", "--resume", "auto"], "--max-restarts 1 needs --processes or --nodes above 1"),
        (["--processes", "2", "--max-restarts", "-1"], "Invalid value for '--max-restarts'"),
    ],
    ids=["no-resume", "resume-path", "one-process", "negative"],
)  # fmt: skip
def test_max_restarts_is_refused_where_a_restart_could_not_continue_the_run(
    tmp_path: Path, args: list[str], message: str
) -> None:
    ckpt = tmp_path / "step-00000004"  # a folder --resume accepts; the refusal comes first
    ckpt.mkdir()
    args = [a.format(ckpt=ckpt) for a in args]
    result = CliRunner().invoke(app, ["train", "--output-dir", str(tmp_path / "runs"), *args])
    assert result.exit_code == 2, result.output
    assert message.format(ckpt=ckpt) in " ".join(result.output.split()), result.output
    assert not (tmp_path / "runs").exists()


def test_the_launch_command_passes_the_restart_count(tmp_path: Path) -> None:
    cmd = launch_command(from_preset("default"), 2, tmp_path / CONFIG_FILE, max_restarts=3)
    assert dict(itertools.pairwise(cmd))["--max_restarts"] == "3"
    assert (
        dict(itertools.pairwise(launch_command(from_preset("default"), 2, tmp_path)))["--max_restarts"] == "0"
    )


@pytest.fixture
def rank_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """As in rank 1 of `mnist-dist train --processes N`: its launch folder in the environment."""
    monkeypatch.setenv(env.LAUNCH_DIR, str(tmp_path))
    monkeypatch.setenv(env.RANK, "1")
    return tmp_path


def test_a_rank_that_stops_on_purpose_exits_0_and_leaves_its_code_for_the_launcher(rank_1: Path) -> None:
    assert preemption.stopped_code(rank_1) is None
    assert preemption.stopped_on_purpose(DIVERGED_EXIT) == 0  # torch's agent must not restart it
    assert preemption.stopped_code(rank_1) == DIVERGED_EXIT
    preemption.rank_started()  # a restarted rank 1: the old attempt's code is stale
    assert preemption.stopped_code(rank_1) is None


def test_a_crashed_rank_leaves_its_error_in_one_line(rank_1: Path) -> None:
    preemption.crashed(RuntimeError("connect failed\ntraceback lines"))
    assert preemption.crash_cause(rank_1) == "rank 1: RuntimeError: connect failed"
    preemption.rank_started()
    assert preemption.crash_cause(rank_1) is None


def test_outside_a_launch_a_stop_keeps_its_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(env.LAUNCH_DIR, raising=False)
    assert preemption.stopped_on_purpose(DIVERGED_EXIT) == DIVERGED_EXIT


def test_the_process_group_is_left_to_accelerate_outside_torchs_agent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mnist_dist.distributed import init_process_group

    monkeypatch.delenv(env.USE_AGENT_STORE, raising=False)
    init_process_group()
    assert not torch.distributed.is_initialized()
