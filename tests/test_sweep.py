"""`mnist-dist sweep`: each seed's config (fast), and as a user runs it (proofs): real seeds side by
side, honest stats, and a stop that stops its runs."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mnist_dist.cli import app
from mnist_dist.config import reference
from mnist_dist.sweep import aggregate, format_table, seed_config

from .helpers import clean_env, cli

TINY = ("--preset", "reference", "--max-train-samples", "4096", "--epochs", "2")


def _runs_of(folder: Path) -> list[int]:
    """Pids of training processes whose command line names `folder` (Linux /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile
            continue
        if "mnist_dist.train" in cmdline and str(folder) in cmdline:
            pids.append(int(proc.name))
    return pids


def test_threads_given_reach_every_run() -> None:
    """Defect (d): --threads was replaced by the sweep's own share of the cores on every CPU."""
    asked = (os.cpu_count() or 1) + 1  # never a share of the cores
    cfg = reference().replace(name="s", threads=asked)
    for jobs in (1, 2):
        run = seed_config(cfg, 3, jobs, cuda=False)
        assert (run.threads, run.seed, run.name) == (asked, 3, "s-seed3")


def test_without_threads_the_runs_share_the_cores() -> None:
    cfg = reference()
    cores = os.cpu_count() or 1
    assert seed_config(cfg, 1, 2, cuda=False).threads == max(1, cores // 2)
    assert seed_config(cfg, 1, cores + 1, cuda=False).threads == 1
    assert seed_config(cfg, 1, 2, cuda=True).threads is None  # a GPU run sets its own
    assert seed_config(cfg, 2, 1, cuda=False).name == "reference-seed2"


def test_a_seed_whose_folder_exists_is_refused_before_any_run(tmp_path: Path) -> None:
    (tmp_path / "s-seed2").mkdir()
    result = CliRunner().invoke(
        app, ["sweep", *TINY, "--seeds", "1,2", "--output-dir", str(tmp_path), "--name", "s"]
    )
    assert result.exit_code == 2
    assert f"run folder {tmp_path / 's-seed2'} already exists" in " ".join(result.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-seed2"]


def _row(seed: int, val: float, **tta: float) -> dict[str, float]:
    return {
        "seed": seed,
        "val_acc": val,
        "test_acc": 0.99,
        "wall_seconds": 10.0 * seed,
        "best_epoch": 2,
        **tta,
    }


def test_the_table_has_tta_columns_exactly_when_the_runs_measured_tta() -> None:
    plain = [_row(1, 0.9944), _row(2, 0.9939)]
    text = format_table({"runs": plain, "stats": aggregate(plain), "failed_seeds": []})
    assert text.splitlines()[0].split() == ["seed", "final", "val", "test", "best", "ep", "wall", "s"]
    assert "TTA" not in text and "val_tta_acc" not in aggregate(plain)
    tta = [
        _row(1, 0.9944, val_tta_acc=0.9946, test_tta_acc=0.9958),
        _row(2, 0.9939, val_tta_acc=0.9942, test_tta_acc=0.9957),
    ]
    stats = aggregate(tta)
    assert stats["val_tta_acc"]["mean"] == statistics.fmean([0.9946, 0.9942])
    assert stats["test_tta_acc"]["min"] == 0.9957 and stats["val_acc"]["max"] == 0.9944
    lines = format_table({"runs": tta, "stats": stats, "failed_seeds": []}).splitlines()
    assert "val, TTA" in lines[0] and "test, TTA" in lines[0]
    assert lines[1].split()[:5] == ["1", "99.44%", "99.00%", "99.46%", "99.58%"]
    assert lines[3].split()[:5] == ["mean", "99.41%", "99.00%", "99.44%", "99.58%"]
    assert lines[-1].startswith("TTA, 7 views:")  # every TTA number labelled with its views


@pytest.mark.proof
def test_sweep_reports_every_seed_and_their_stats(tmp_path: Path, data_root: Path) -> None:
    """With --tta each run's TTA results join the report, beside (never instead of) the plain ones."""
    result = cli(
        "sweep", *TINY, "--tta", "--seeds", "1,2", "--jobs", "2", "--output-dir", str(tmp_path), "--name", "s"
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "s.json").read_text())
    assert [r["seed"] for r in report["runs"]] == [1, 2] and report["failed_seeds"] == []
    vals = [r["val_acc"] for r in report["runs"]]
    assert vals[0] != vals[1]  # different seeds, different runs
    assert report["stats"]["val_acc"]["mean"] == statistics.mean(vals)
    assert report["stats"]["val_acc"]["min"] == min(vals)
    for seed, row in zip((1, 2), report["runs"], strict=True):
        summary = json.loads((tmp_path / f"s-seed{seed}" / "summary.json").read_text())
        assert summary["seed"] == seed and summary["epochs"] == 2
        assert (row["val_acc"], row["val_tta_acc"]) == (summary["val_acc"], summary["val_tta_acc"])
    tta_vals = [r["test_tta_acc"] for r in report["runs"]]
    assert report["stats"]["test_tta_acc"]["mean"] == statistics.mean(tta_vals)
    assert "mean" in result.stdout and "min" in result.stdout and "val, TTA" in result.stdout


@pytest.mark.proof
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stopped_sweep_stops_its_runs(tmp_path: Path, data_root: Path, stop: signal.Signals) -> None:
    """SIGINT goes to the sweep alone here: the runs must be stopped by the sweep, not by the
    terminal's Ctrl-C reaching them too. The sweep's config files lie in TMPDIR, inside tmp_path, so
    the runs' command lines name tmp_path."""
    (tmp_path / "tmp").mkdir()
    env = clean_env(TMPDIR=str(tmp_path / "tmp"))
    sweep = subprocess.Popen(
        [sys.executable, "-m", "mnist_dist.cli", "sweep", "--preset", "reference", "--epochs", "19",
         "--seeds", "1,2", "--jobs", "2", "--output-dir", str(tmp_path), "--name", "long"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # pytest may run as `cmd &`
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(_runs_of(tmp_path)) < 2 and time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.5)
        assert len(_runs_of(tmp_path)) == 2, "the sweep never started its two runs"
        sweep.send_signal(stop)
        assert sweep.wait(timeout=120) == 128 + stop
        assert _runs_of(tmp_path) == []  # the sweep waited for its runs to end
    finally:
        sweep.kill()
        for pid in _runs_of(tmp_path):  # never leave a 19-epoch run behind, whatever failed above
            os.kill(pid, signal.SIGKILL)
