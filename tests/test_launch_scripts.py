"""The launch/ scripts: syntax, train.sh's process count, and both SLURM scripts end to end.

    pytest tests/test_launch_scripts.py   # a few minutes on 2 CPU cores; needs MNIST (MNIST_DATA_DIR)

The SLURM scripts run here with SLURM's environment variables set and the stand-ins of
tests/fakes on PATH: `srun` runs one local process per "node" (with its own SLURM_NODEID) and
passes signals to them, `scontrol` answers `show hostnames` with 127.0.0.1 and records `requeue`.
Each job is preempted (the scheduler's signals, sent to the step and the batch shell), must exit 75
with one requeue request, and is then run again as the requeued job, which continues from the
checkpoint and finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mnist_dist import data as D
from mnist_dist.config import default_data_dir

from .helpers import free_port, started

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "launch" / name for name in ("train.sh", "slurm.sbatch", "slurm_multinode.sbatch")]
SBATCH = SCRIPTS[1:]
FAKES = Path(__file__).resolve().parent / "fakes"
VENV_BIN = Path(sys.executable).parent
TINY = ("--max-train-samples", "1024", "--epochs", "1", "--wandb", "disabled", "--checkpoint-every", "1")
TIMEOUT = 400
needs_mnist = pytest.mark.skipif(
    bool(D.missing_files(default_data_dir())), reason="MNIST not found (set MNIST_DATA_DIR)"
)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_is_clean() -> None:
    files = [*SCRIPTS, FAKES / "scontrol", FAKES / "nvidia-smi"]
    done = subprocess.run(["shellcheck", *map(str, files)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_directives(script: Path) -> None:
    """sbatch reads #SBATCH lines only up to the first command; preemption needs these three."""
    lines = script.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [line.split()[1] for line in lines[:first_command] if line.startswith("#SBATCH")]
    assert not [line for line in lines[first_command:] if line.startswith("#SBATCH")]
    assert {"--ntasks-per-node=1", "--requeue", "--open-mode=append"} <= set(directives)
    assert any(d.startswith("--signal=USR1@") for d in directives)


@pytest.mark.parametrize(
    ("env", "processes"),
    [
        ({}, 1),  # no GPU: one CPU process
        ({"FAKE_GPUS": "8"}, 8),
        ({"FAKE_GPUS": "8", "GPUS": "1"}, 1),
        ({"FAKE_GPUS": "8", "CUDA_VISIBLE_DEVICES": "2,5"}, 2),
        ({"FAKE_GPUS": "8", "CUDA_VISIBLE_DEVICES": ""}, 1),
        ({"PROCESSES": "2"}, 2),
    ],
)
def test_train_sh_starts_one_process_per_visible_gpu(env: dict[str, str], processes: int) -> None:
    path = f"{FAKES}:/usr/bin:/bin" if "FAKE_GPUS" in env else "/usr/bin:/bin"
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "GPUS", "PROCESSES")}
    done = subprocess.run(
        ["bash", str(SCRIPTS[0]), "--preset", "reference", "--name", "my run"],
        env={**base, "PATH": path, "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert (
        done.stdout.strip() == f"mnist-dist train --processes {processes} --preset reference --name my\\ run"
    )


# ---------------------------------------------------------------------- SLURM, end to end
def slurm_env(tmp: Path, nodes: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE"))}
    (tmp / "slurm").mkdir(exist_ok=True)
    (tmp / "tmp").mkdir(exist_ok=True)
    env.update(
        PATH=f"{FAKES}:{VENV_BIN}:{env['PATH']}",
        FAKE_SLURM_DIR=str(tmp / "slurm"),
        TMPDIR=str(tmp / "tmp"),
        PYTHONUNBUFFERED="1",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="mnist-test",
        SLURM_NNODES=str(nodes),
        SLURM_JOB_NODELIST="node[01-02]" if nodes == 2 else "node01",
        SLURM_SUBMIT_DIR=str(tmp),
        MAIN_PORT=str(free_port()),
        CUDA_VISIBLE_DEVICES="",  # CPU "nodes", also on a machine with GPUs
    )
    return env


@contextmanager
def submitted(script: Path, tmp: Path, nodes: int, log: Path) -> Iterator[subprocess.Popen]:
    """`bash script` as SLURM's batch shell; afterwards, kill whatever of the job is still alive
    (srun's tasks and torch's workers run in groups of their own: `started` finds them)."""
    cmd = ["bash", str(script), "--output-dir", str(tmp / "runs"), *TINY]
    with started(cmd, tmp, log, environment=slurm_env(tmp, nodes)) as proc:
        yield proc


def wait_for(path: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert proc.poll() is None, (
            f"job ended ({proc.returncode}) before {path} appeared:\n{log.read_text()}"
        )
        assert time.monotonic() < deadline, f"{path} did not appear in {TIMEOUT} s"
        time.sleep(0.05)


def preempt_then_requeue(script: Path, tmp: Path, nodes: int, to_batch_shell: bool) -> str:
    """Run the job, signal it as SLURM would, check it stops at a checkpoint; run it again as the
    requeued job. Returns the first run's log."""
    run_dir = tmp / "runs" / "mnist-test-4242"
    with submitted(script, tmp, nodes, tmp / "first.log") as job:
        wait_for(run_dir / "checkpoints" / "step-00000001", job, tmp / "first.log")  # in the loop
        srun = json.loads((tmp / "slurm" / "srun.json").read_text())
        if to_batch_shell:  # preemption: SIGTERM to every process of the job, the batch shell too
            os.kill(job.pid, signal.SIGTERM)
            os.kill(srun["pid"], signal.SIGTERM)
        else:  # --signal=USR1@120 before the time limit: the job step only
            os.kill(srun["pid"], signal.SIGUSR1)
        code = job.wait(timeout=TIMEOUT)
    first = (tmp / "first.log").read_text()
    assert code == 75, first
    assert (tmp / "slurm" / "scontrol.log").read_text().count("requeue 4242\n") == 1
    assert "stopped at a checkpoint" in first
    assert not (run_dir / "summary.json").exists()
    with submitted(script, tmp, nodes, tmp / "second.log") as job:
        code = job.wait(timeout=TIMEOUT)
    second = (tmp / "second.log").read_text()
    assert code == 0, second
    assert "resumed from" in second
    return first


@pytest.mark.proof
@needs_mnist
def test_slurm_single_node_job_is_preempted_requeued_and_finishes(tmp_path: Path) -> None:
    first = preempt_then_requeue(SBATCH[0], tmp_path, nodes=1, to_batch_shell=True)
    assert "signal received; waiting for the ranks to checkpoint" in first  # the batch shell waited
    srun = json.loads((tmp_path / "slurm" / "srun.json").read_text())
    assert srun["options"] == {"--nodes": "1", "--ntasks": "1"}
    assert srun["command"][:4] == ["mnist-dist", "train", "--processes", "1"]
    summary = json.loads((tmp_path / "runs" / "mnist-test-4242" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 8


@pytest.mark.proof
@needs_mnist
def test_slurm_two_node_job_is_preempted_requeued_and_finishes(tmp_path: Path) -> None:
    first = preempt_then_requeue(SBATCH[1], tmp_path, nodes=2, to_batch_shell=False)
    assert first.count("preempted: the ranks saved a checkpoint") == 2  # each node's mnist-dist
    assert (tmp_path / "slurm" / "scontrol.log").read_text().startswith("show hostnames node[01-02]\n")
    # Two nodes of one process each formed ONE run of world size 2 (an unescaped $SLURM_NODEID
    # would have made both node 0, and the ranks check the world size they get).
    summary = json.loads((tmp_path / "runs" / "mnist-test-4242" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
