"""`.ci/gpu_accuracy.py`, the GPU sweep of docs/accuracy.md, on a tiny CPU slice: its plan runs a
distilled recipe's teachers first and hands their finished run folders to the student."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_dist import data as D
from mnist_dist.config import default_data_dir

from .helpers import REPO, clean_env

TINY = "--max-train-samples 256 --epochs 1 --threads 1 --no-compile --log-every 1"


@pytest.mark.proof
@pytest.mark.skipif(bool(D.missing_files(default_data_dir())), reason="MNIST not found (set MNIST_DATA_DIR)")
def test_a_distilled_recipe_runs_after_its_teachers_and_is_taught_by_them(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out.json"
    cmd = [
        sys.executable, str(REPO / ".ci/gpu_accuracy.py"), "--data-dir", str(default_data_dir()),
        "--out", str(out), "--runs", str(runs), "--recipes", "net_distilled", "--seeds", "1,2",
        "--jobs", "4", "--budget", "400", "--extra", TINY,
    ]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=500
    )
    assert done.returncode == 0, done.stderr
    recipes = json.loads(out.read_text())["recipes"]
    assert list(recipes) == ["default", "net_distilled"]  # the teachers were planned, and first
    assert [r["seed"] for r in recipes["default"]["runs"]] == [1, 2]
    assert [r["seed"] for r in recipes["net_distilled"]["runs"]] == [1, 2]
    teachers = [str(runs / f"default-seed{s}") for s in (1, 2)]
    for seed in (1, 2):
        summary = json.loads((runs / f"net_distilled-seed{seed}" / "summary.json").read_text())
        assert summary["distill_from"] == teachers
        assert summary["params"] == 8440


def test_unknown_recipes_are_refused_by_name(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(REPO / ".ci/gpu_accuracy.py"),
        "--data-dir",
        ".",
        "--out",
        "o",
        "--recipes",
        "nope",
    ]
    done = subprocess.run(
        cmd, cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "unknown recipes nope" in done.stderr
    assert not (tmp_path / "gpu_runs").exists()


def test_every_round_names_known_recipes() -> None:
    """A typo in a round would only surface on the GPU, after the machine's minutes had started."""
    import runpy

    script = runpy.run_path(str(REPO / ".ci/gpu_accuracy.py"), run_name="gpu_accuracy")
    for round_name, names in script["ROUNDS"].items():
        unknown = [n for n in names.split(",") if n not in script["RECIPES"]]
        assert not unknown, f"round {round_name} names unknown recipes {unknown}"
    assert "net_default" in script["ROUNDS"]["round5"].split(",")
