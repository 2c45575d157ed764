"""Stopping on signals, in-process: which signal gives which exit code, that SIGINT is watched only
while the loop runs, the launch folder's pid files and marker, and the launcher's command line. The
two proofs start small real processes: the fake scontrol, and a fake worker behind the launcher's
signal forwarding."""

from __future__ import annotations

import itertools
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from accelerate import Accelerator

from mnist_dist import env
from mnist_dist.config import from_preset
from mnist_dist.launch import CONFIG_FILE, launch_command, run_ranks
from mnist_dist.preemption import (
    INTERRUPTED_EXIT,
    PREEMPTED_EXIT,
    Preempted,
    PreemptionWatch,
    requeue_slurm_job,
    was_preempted,
    worker_pids,
)

from .helpers import REPO, clean_env


@pytest.fixture
def launch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """As under `mnist-dist train --processes N`: the workers' folder is in the environment."""
    monkeypatch.setenv(env.LAUNCH_DIR, str(tmp_path))
    return tmp_path


@pytest.fixture
def watch() -> Iterator[PreemptionWatch]:
    """A watch installed over Python's own Ctrl-C handler (a test run started in the background
    inherits SIGINT ignored, and the watch restores whatever it found)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    w = PreemptionWatch(Accelerator(cpu=True))
    yield w
    w.close()
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGTERM, PREEMPTED_EXIT), (signal.SIGUSR1, PREEMPTED_EXIT), (signal.SIGINT, INTERRUPTED_EXIT)],
    ids=["SIGTERM", "SIGUSR1", "SIGINT"],
)
def test_a_signal_stops_at_the_next_step_with_its_exit_code(
    watch: PreemptionWatch, signum: int, code: int
) -> None:
    assert not watch.should_stop(1)
    signal.raise_signal(signum)  # only recorded: no KeyboardInterrupt, no exit
    assert watch.should_stop(2)
    stop = watch.preempted(Path("ckpt"), from_preset("reference"))
    assert isinstance(stop, Preempted) and stop.exit_code == code
    assert f"stopped by {signal.Signals(signum).name}" in str(stop)
    assert f"(exit code {code})" in str(stop)


def test_a_schedulers_signal_outranks_a_ctrl_c(watch: PreemptionWatch) -> None:
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGINT)
    assert watch.preempted(Path("ckpt"), from_preset("reference")).exit_code == PREEMPTED_EXIT


def test_after_close_ctrl_c_is_a_keyboard_interrupt_again(watch: PreemptionWatch) -> None:
    watch.close()
    watch.close()  # idempotent: the trainer closes it when the loop ends and again on the way out
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert watch.signal is None


def test_workers_register_their_pid_and_leave_a_marker_naming_the_signal(launch_dir: Path) -> None:
    watch = PreemptionWatch(Accelerator(cpu=True))
    try:
        assert worker_pids(launch_dir) == [os.getpid()]
        assert was_preempted(launch_dir) is None
        signal.raise_signal(signal.SIGINT)
        assert watch.should_stop(1)
        watch.preempted(Path("ckpt"), from_preset("reference"))
    finally:
        watch.close()
    assert worker_pids(launch_dir) == []
    assert was_preempted(launch_dir) == signal.SIGINT


def test_requeue_outside_slurm_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (env.SLURM_JOB_ID, env.SLURM_ARRAY_JOB_ID, env.SLURM_ARRAY_TASK_ID):
        monkeypatch.delenv(name, raising=False)  # run inside a SLURM job, this must not requeue it
    assert "not running under SLURM" in requeue_slurm_job()


def test_launch_command_hands_the_ranks_the_config_file(tmp_path: Path) -> None:
    cfg = from_preset("default", precision="bf16")
    cmd = launch_command(cfg, 2, tmp_path / CONFIG_FILE, nodes=2, node_rank=1, main_port=29_500)
    assert cmd[-4:] == ["-m", "mnist_dist.train", "--config", str(tmp_path / CONFIG_FILE)]
    options = dict(itertools.pairwise(cmd))  # each option and what follows it
    assert options["--num_processes"] == "4" and options["--machine_rank"] == "1"
    assert options["--mixed_precision"] == "bf16" and options["--main_process_port"] == "29500"
    assert "--same_network" in cmd


# ---------------------------------------------------------------------- proofs: real processes
@pytest.mark.proof
@pytest.mark.parametrize(("signum", "requeued"), [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_requeue_after_a_preemption_but_not_after_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int, requeued: bool
) -> None:
    monkeypatch.setenv("PATH", f"{REPO / 'tests/fakes'}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path))
    monkeypatch.setenv(env.SLURM_JOB_ID, "4242")
    monkeypatch.delenv(env.SLURM_ARRAY_JOB_ID, raising=False)
    monkeypatch.delenv(env.SLURM_ARRAY_TASK_ID, raising=False)
    watch = PreemptionWatch(Accelerator(cpu=True))
    try:
        signal.raise_signal(signum)
        watch.preempted(Path("ckpt"), from_preset("reference", requeue=True))
    finally:
        watch.close()
    log = tmp_path / "scontrol.log"
    assert (log.read_text() if log.exists() else "") == ("requeue 4242\n" if requeued else "")


FAKE_WORKER = """
import os, signal, sys, time
from pathlib import Path
folder = Path(os.environ["{launch_dir}"])
(folder / "inherited").write_text(str(signal.getsignal(signal.SIGINT) == signal.SIG_IGN))
got = []
signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
(folder / "pid-0").write_text(str(os.getpid()))
while not got:
    time.sleep(0.01)
(folder / "preempted-0").write_text("SIGINT\\nckpt\\n")
sys.exit(1)  # what torch's agent reports for a worker that stopped
"""


@pytest.mark.proof
def test_the_launcher_passes_ctrl_c_to_the_workers_only_and_returns_130(tmp_path: Path) -> None:
    """The launched process starts with SIGINT ignored (torch's agent must not turn a Ctrl-C into
    SIGTERM for its workers); a SIGINT to the launcher reaches the registered worker as SIGINT, and
    the code comes from the marker the worker left, not from the process."""
    cmd = [sys.executable, "-c", FAKE_WORKER.format(launch_dir=env.LAUNCH_DIR)]

    def ctrl_c_once_registered(signum: int, frame: object) -> None:
        if worker_pids(tmp_path):
            signal.raise_signal(signal.SIGINT)
        else:
            signal.alarm(1)

    previous = signal.signal(signal.SIGALRM, ctrl_c_once_registered)
    interactive = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    signal.alarm(1)
    try:
        code = run_ranks(cmd, clean_env(**{env.LAUNCH_DIR: str(tmp_path)}), tmp_path)
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        signal.signal(signal.SIGINT, interactive)
    assert code == INTERRUPTED_EXIT
    assert (tmp_path / "inherited").read_text() == "True"
    assert restored is signal.default_int_handler  # the launcher's own handler is back
