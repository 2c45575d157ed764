""".ci/eval_batch.py, which measured the evaluation batch: it times the default batch beside the ones
asked for, and refuses a bad value by name before loading anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_dist import data as D
from mnist_dist.config import TrainConfig, default_data_dir

from .helpers import REPO, clean_env

pytestmark = pytest.mark.proof
SCRIPT = REPO / ".ci/eval_batch.py"


def script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.skipif(bool(D.missing_files(default_data_dir())), reason="MNIST not found (set MNIST_DATA_DIR)")
def test_one_round_writes_every_batch_and_the_default_to_json(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    done = script(
        "--models", "net", "--batches", "1000", "--rounds", "1", "--threads", "1", "--json", str(out)
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    rows = {row["batch"]: row for row in result["rows"]}
    assert set(rows) == {1000, TrainConfig.eval_batch_size}
    assert rows[TrainConfig.eval_batch_size]["vs_default_batch"] == 1.0
    assert all(row["images_per_second"] > 0 and len(row["rounds"]) == 1 for row in rows.values())
    assert result["threads"] == 1 and "eval_batch.py" in result["command"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--batches", "256,x"), "--batches must be positive integers"),
        (("--batches", "0"), "--batches must be positive integers"),
        (("--models", "nett"), "'nett' not among net"),
        (("--rounds", "0"), "--rounds: must be an integer >= 1, got '0'"),
        (("--json", "/nonexistent/e.json"), "folder '/nonexistent' does not exist"),
    ],
)
def test_a_bad_value_is_refused_by_name(args: tuple[str, ...], says: str) -> None:
    done = script(*args)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
