"""SLURM job arrays: a preempted array task asks `scontrol` to requeue that task alone, and each task
of an array trains in a run folder of its own. The fakes of tests/fakes stand in for `scontrol` and
`srun` (each run takes a fraction of a second), and a stand-in `mnist-dist` records the command the
batch scripts start instead of training."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mnist_dist import env
from mnist_dist.preemption import requeue_slurm_job

from .helpers import REPO, clean_env

FAKES = REPO / "tests" / "fakes"
SBATCH = [REPO / "launch" / name for name in ("slurm.sbatch", "slurm_multinode.sbatch")]
ARRAY_TASK = {env.SLURM_JOB_ID: "4242", env.SLURM_ARRAY_JOB_ID: "4242", env.SLURM_ARRAY_TASK_ID: "7"}
SLURM_VARS = (env.SLURM_JOB_ID, env.SLURM_ARRAY_JOB_ID, env.SLURM_ARRAY_TASK_ID)
RECORDING_MNIST_DIST = """#!/usr/bin/env bash
printf '%s\\n' "$@" >"$FAKE_SLURM_DIR/mnist-dist.${SLURM_NODEID}"
"""


@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fakes first on PATH, their records in tmp_path, and no SLURM job variables of our own."""
    monkeypatch.setenv("PATH", f"{FAKES}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path))
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.mark.parametrize(
    ("job", "requeued"),
    [
        # Task 7 of array job 4242, the array's first task: its SLURM_JOB_ID is the array's id too.
        (ARRAY_TASK, "4242_7"),
        ({env.SLURM_JOB_ID: "4250", env.SLURM_ARRAY_JOB_ID: "4242", env.SLURM_ARRAY_TASK_ID: "9"}, "4242_9"),
        ({env.SLURM_JOB_ID: "4242"}, "4242"),  # a job outside an array
    ],
    ids=["array-first-task", "array-later-task", "plain-job"],
)
def test_requeue_names_the_array_task_not_the_array(
    slurm: Path, monkeypatch: pytest.MonkeyPatch, job: dict[str, str], requeued: str
) -> None:
    for name, value in job.items():
        monkeypatch.setenv(name, value)
    assert requeue_slurm_job() == f"mnist-dist: requeued SLURM job {requeued}"
    assert (slurm / "scontrol.log").read_text() == f"requeue {requeued}\n"


def test_a_failed_requeue_is_reported_with_scontrols_error(
    slurm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.SLURM_JOB_ID, "not-a-job")
    assert requeue_slurm_job() == (
        "mnist-dist: scontrol requeue not-a-job failed (1): scontrol: error: Invalid job id specified: "
        "not-a-job"
    )


def batch_args(script: Path, tmp: Path, **job: str) -> list[str]:
    """The arguments the batch script gives `mnist-dist`, run as SLURM's batch shell would."""
    fake = tmp / "bin" / "mnist-dist"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(RECORDING_MNIST_DIST)
    fake.chmod(0o755)
    base = {k: v for k, v in clean_env().items() if not k.startswith("SLURM_") and k != "RUN_NAME"}
    slurm_env = {
        "PATH": f"{fake.parent}:{FAKES}:{base['PATH']}", "FAKE_SLURM_DIR": str(tmp),
        "SLURM_JOB_NAME": "mnist-test", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node01",
    }  # fmt: skip
    done = subprocess.run(
        ["bash", str(script), "--preset", "reference"],
        cwd=tmp, env={**base, **slurm_env, **job}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return (tmp / "mnist-dist.0").read_text().splitlines()


def run_name(script: Path, tmp: Path, **job: str) -> str:
    """The --name the batch script gives `mnist-dist train`."""
    args = batch_args(script, tmp, **job)
    return args[args.index("--name") + 1]


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
@pytest.mark.parametrize(
    ("job", "name"),
    [
        ({env.SLURM_JOB_ID: "4250", env.SLURM_ARRAY_JOB_ID: "4242", env.SLURM_ARRAY_TASK_ID: "7"}, "mnist-test-4242_7"),
        ({env.SLURM_JOB_ID: "4250", env.SLURM_ARRAY_JOB_ID: "4242", env.SLURM_ARRAY_TASK_ID: "8"}, "mnist-test-4242_8"),
        ({**ARRAY_TASK, "RUN_NAME": "exp1"}, "exp1_7"),
        ({env.SLURM_JOB_ID: "4250"}, "mnist-test-4250"),
        ({env.SLURM_JOB_ID: "4250", "RUN_NAME": "exp1"}, "exp1"),
    ],
    ids=["array-task-7", "array-task-8", "array-run-name", "plain-job", "plain-run-name"],
)  # fmt: skip
def test_each_array_task_trains_in_a_run_folder_of_its_own(
    tmp_path: Path, script: Path, job: dict[str, str], name: str
) -> None:
    """The name comes from the job's ids alone, so the requeued task (same ids) finds its folder."""
    assert run_name(script, tmp_path, **job) == name


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
@pytest.mark.parametrize(("job", "restarts"), [({}, "0"), ({"MAX_RESTARTS": "3"}, "3")], ids=["unset", "3"])
def test_max_restarts_reaches_the_launch_with_resume_auto(
    tmp_path: Path, script: Path, job: dict[str, str], restarts: str
) -> None:
    """The restarted ranks continue the run: the scripts pair --max-restarts with --resume auto."""
    args = batch_args(script, tmp_path, **{env.SLURM_JOB_ID: "4250", **job})
    assert args[args.index("--max-restarts") + 1] == restarts
    assert args[args.index("--resume") + 1] == "auto"
