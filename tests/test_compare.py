"""`mnist-dist compare` on run folders alone: two short in-process runs on synthetic digits, and a copy
of one cut back to its first epoch without a summary (a stopped run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mnist_dist import runfiles
from mnist_dist import trainer as T
from mnist_dist.cli import app
from mnist_dist.config import from_preset
from mnist_dist.data import MNISTArrays

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, digits: MNISTArrays) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    common = {
        "epochs": 2,
        "max_train_samples": 512,
        "output_dir": str(root),
        "wandb": "disabled",
        "threads": 1,
        "compile": False,  # the table is the same; compiling net_wider costs a cold machine about 20 s
    }
    for name, preset, tta in [
        ("ref", "reference", False),
        ("wide", "default", False),
        ("tta", "reference", True),
    ]:
        T.train(from_preset(preset, name=name, tta=tta, **common), data=digits)
    stopped = root / "stopped"
    shutil.copytree(root / "ref", stopped)
    (stopped / runfiles.SUMMARY_FILE).unlink()
    first_epoch_steps = summary(root / "ref")["steps"] // 2
    runfiles.trim_metrics(stopped, global_step=first_epoch_steps, epoch=1)  # as if stopped after epoch 1
    return {"ref": root / "ref", "wide": root / "wide", "stopped": stopped, "tta": root / "tta"}


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / runfiles.SUMMARY_FILE).read_text())


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["compare", *args], env={"MNIST_DATA_DIR": "/nonexistent"})


def test_the_json_table_holds_each_runs_results(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "c.png"
    result = invoke(str(runs["ref"]), str(runs["wide"]), str(runs["stopped"]), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"wrote {out}" and out.read_bytes().startswith(PNG)
    ref, wide, stopped = json.loads(result.stdout)
    for row, run, model in [(ref, runs["ref"], "net"), (wide, runs["wide"], "net_wider")]:
        s = summary(run)
        assert row["status"] == "finished" and row["model"] == model and row["preset"] == s["preset"]
        for key in (
            "params",
            "world_size",
            "val_acc",
            "test_acc",
            "best_epoch",
            "wall_seconds",
            "train_seconds",
        ):
            assert row[key] == s[key], key
        assert row["images_per_second"] == s["train_images_per_second"]
        assert row["val_tta_acc"] is None and row["test_tta_acc"] is None  # trained without --tta
        assert (row["epochs_done"], row["epochs_planned"]) == (2, 2)
    first_epoch = next(r for r in runfiles.read_metrics(runs["ref"]) if r["kind"] == "epoch")
    assert stopped["status"] == "unfinished" and (stopped["epochs_done"], stopped["epochs_planned"]) == (1, 2)
    assert stopped["val_acc"] == first_epoch["val_acc"] and stopped["test_acc"] is None
    assert stopped["params"] == ref["params"] and stopped["train_seconds"] == first_epoch["epoch_seconds"]
    assert stopped["best_epoch"] == 1


def test_the_text_table_has_a_line_per_run(runs: dict[str, Path], tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)  # --out defaults to compare.png here
    result = invoke(str(runs["ref"]), str(runs["stopped"]))
    assert result.exit_code == 0, result.output
    header, ref, stopped, wrote = result.stdout.splitlines()
    assert header.split() == [
        "run", "preset", "model", "params", "epochs", "world", "val", "test", "best", "wall", "train",
        "img/s", "status",
    ]  # fmt: skip
    s = summary(runs["ref"])
    assert ref.split()[:9] == [
        str(runs["ref"]), "reference", "net", f"{s['params']:,}", "2", "1",
        f"{100 * s['val_acc']:.2f}%", f"{100 * s['test_acc']:.2f}%", str(s["best_epoch"]),
    ]  # fmt: skip
    assert ref.split()[-1] == "finished"
    cells = stopped.split()  # epochs, world, val, test, best, wall ... status
    assert [cells[i] for i in (4, 5, 7, 8, 9)] == ["1/2", "-", "-", "1", "-"] and cells[-1] == "unfinished"
    assert wrote == "wrote compare.png" and (tmp_path / "compare.png").read_bytes().startswith(PNG)


def test_runs_that_measured_tta_add_its_labelled_columns(runs: dict[str, Path], tmp_path: Path) -> None:
    result = invoke(str(runs["ref"]), str(runs["tta"]), "--out", str(tmp_path / "c.png"))
    assert result.exit_code == 0, result.output
    header, ref, tta, label, _ = result.stdout.splitlines()
    assert header.split()[6:11] == ["val", "test", "val,", "TTA", "test,"]
    s = summary(runs["tta"])
    plain_and_tta = [f"{100 * s[k]:.2f}%" for k in ("val_acc", "test_acc", "val_tta_acc", "test_tta_acc")]
    assert tta.split()[6:10] == plain_and_tta and ref.split()[8:10] == ["-", "-"]
    assert label.startswith("TTA, 7 views:")
    rows = json.loads(invoke(str(runs["tta"]), "--out", str(tmp_path / "c.png"), "--json").stdout)
    assert (rows[0]["val_tta_acc"], rows[0]["test_tta_acc"]) == (s["val_tta_acc"], s["test_tta_acc"])


def test_a_folder_that_is_not_a_run_is_refused_before_any_picture(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "c.png"
    for bad, says in [
        (tmp_path / "empty", f"{tmp_path / 'empty'} is not a run folder: it has no metrics.jsonl"),
        (tmp_path / "missing", f"{tmp_path / 'missing'} is not a run folder: it does not exist"),
    ]:
        result = invoke(str(runs["ref"]), str(bad), "--out", str(out))
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.stderr.startswith(f"Error: {says}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    result = invoke(str(runs["ref"]), "--out", str(tmp_path / "no" / "c.png"))
    assert result.exit_code == 2 and "must be a file in an existing folder" in result.stderr
