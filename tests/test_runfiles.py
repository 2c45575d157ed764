"""The run folder's files: what a killed run leaves is read back sensibly, a resume trims what it will
log again, the predictions round-trip, a failed write leaves the previous file, and `mnist-dist report`
draws the pictures from these files alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mnist_dist import runfiles as R
from mnist_dist.cli import app
from mnist_dist.config import TrainConfig
from mnist_dist.files import atomic_write


def write_lines(run: Path, *lines: str) -> Path:
    run.mkdir(exist_ok=True)
    (run / R.METRICS_FILE).write_text("".join(line + "\n" for line in lines))
    return run


def step(n: int) -> str:
    return json.dumps({"kind": "step", "step": n, "epoch": n / 2, "train/loss": 1 / n, "lr": 0.01})


def epoch(n: int) -> str:
    return json.dumps({"kind": "epoch", "epoch": n, "train_loss": 1 / n, "train_acc": 0.5, "val_loss": 1 / n,
                       "val_acc": 0.5 + n / 100, "lr": 0.01})  # fmt: skip


def test_metrics_log_appends_timed_records_that_read_back(tmp_path: Path) -> None:
    log = R.MetricsLog(tmp_path)
    log.write({"kind": "step", "step": 1, "train/loss": 0.5})
    log.write({"kind": "epoch", "epoch": 1, "val_acc": 0.9})
    assert len((tmp_path / R.METRICS_FILE).read_text().splitlines()) == 2  # on disk before close
    log.close()
    again = R.MetricsLog(tmp_path)  # a resumed run appends
    again.write({"kind": "step", "step": 2, "train/loss": 0.25})
    again.close()
    records = R.read_metrics(tmp_path)
    assert [r.get("step", r.get("epoch")) for r in records] == [1, 1, 2]
    assert all(isinstance(r["time"], float) for r in records)
    assert records[1] == {"time": records[1]["time"], "kind": "epoch", "epoch": 1, "val_acc": 0.9}


def test_read_metrics_drops_a_torn_last_line_and_refuses_a_bad_middle_one(tmp_path: Path) -> None:
    run = write_lines(tmp_path / "killed", step(1), step(2), step(3)[:17])
    assert [r["step"] for r in R.read_metrics(run)] == [1, 2]
    bad = write_lines(tmp_path / "bad", step(1), "{not json", step(3))
    with pytest.raises(R.RunFilesError, match=r"metrics\.jsonl line 2 is not JSON"):
        R.read_metrics(bad)
    with pytest.raises(R.RunFilesError, match=r"is not a run folder: it has no metrics\.jsonl"):
        R.read_metrics(tmp_path / "nothing")


def test_trim_metrics_drops_records_past_the_resumed_position(tmp_path: Path) -> None:
    lines = [step(1), step(2), epoch(1), step(3), step(4), epoch(2), step(5), step(6)]
    run = write_lines(tmp_path / "run", *lines, step(7)[:9])  # killed mid-line after step 6
    R.trim_metrics(run, global_step=4, epoch=2)
    assert (run / R.METRICS_FILE).read_text() == "".join(line + "\n" for line in lines[:6])
    R.trim_metrics(run, global_step=2, epoch=1)
    assert [r.get("step", r.get("epoch")) for r in R.read_metrics(run)] == [1, 2, 1]
    assert sorted(p.name for p in run.iterdir()) == [R.METRICS_FILE]  # no temporary file left
    R.trim_metrics(tmp_path / "fresh", global_step=0, epoch=0)  # no metrics yet: nothing to trim
    assert not (tmp_path / "fresh").exists()


def predictions(wrong: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(wrong)
    labels = torch.randint(0, 10, (500,), generator=gen)
    preds = labels.clone()
    preds[:wrong] = (labels[:wrong] + 1) % 10
    images = torch.randint(0, 256, (500, 1, 28, 28), generator=gen, dtype=torch.uint8)
    return labels, preds, images


@pytest.mark.parametrize("wrong", [0, 5, 100])
def test_validation_predictions_round_trip(tmp_path: Path, wrong: int) -> None:
    labels, preds, images = predictions(wrong)
    R.save_val_predictions(tmp_path, labels, preds, images)
    saved = R.load_val_predictions(tmp_path)
    assert torch.equal(saved["labels"].long(), labels) and torch.equal(saved["predictions"].long(), preds)
    shown = min(wrong, R.MAX_MISCLASSIFIED)
    assert torch.equal(saved["wrong_index"], torch.arange(shown))
    assert torch.equal(saved["wrong_images"], images[:shown, 0])


def test_an_unreadable_predictions_file_is_named(tmp_path: Path) -> None:
    (tmp_path / R.PREDICTIONS_FILE).write_bytes(b"\x00" * 100)
    with pytest.raises(R.RunFilesError, match=r"val_predictions\.safetensors is unreadable"):
        R.load_val_predictions(tmp_path)


def test_config_summary_and_wandb_id_read_back(tmp_path: Path) -> None:
    assert R.read_config(tmp_path) is None and R.read_wandb_id(tmp_path) is None
    cfg = TrainConfig(model="net_wider", epochs=3)
    R.write_config(tmp_path, cfg)
    assert TrainConfig.from_dict(R.read_config(tmp_path)) == cfg
    R.write_summary(tmp_path, {"val_acc": 0.99, "b": [1, 2]})
    assert (
        tmp_path / R.SUMMARY_FILE
    ).read_text() == '{\n  "b": [\n    1,\n    2\n  ],\n  "val_acc": 0.99\n}\n'
    R.write_wandb_id(tmp_path, "abc123")
    assert R.read_wandb_id(tmp_path) == "abc123"
    (tmp_path / R.CONFIG_FILE).write_text('{"model": "net"')  # torn
    with pytest.raises(R.RunFilesError, match=r"config\.json is unreadable"):
        R.read_config(tmp_path)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    R.write_summary(tmp_path, {"val_acc": 0.5})
    before = (tmp_path / R.SUMMARY_FILE).read_bytes()

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text('{"val_acc": 0.')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / R.SUMMARY_FILE, half_then_fail)
    with pytest.raises(TypeError):
        R.write_summary(tmp_path, {"val_acc": object()})
    assert (tmp_path / R.SUMMARY_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [R.SUMMARY_FILE]


# ---------------------------------------------------------------------- mnist-dist report
def test_report_draws_every_picture_from_the_run_files(tmp_path: Path) -> None:
    run = write_lines(tmp_path / "run", step(1), step(2), epoch(1), step(3), step(4), epoch(2))
    R.save_val_predictions(run, *predictions(7))
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    pictures = ("curves.png", "confusion_matrix.png", "misclassified.png")
    assert result.stdout.splitlines() == [f"wrote {run / name}" for name in pictures]
    for name in pictures:
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(p.name for p in run.iterdir()) == sorted([*pictures, R.METRICS_FILE, R.PREDICTIONS_FILE])


def test_report_refuses_unreadable_predictions_without_drawing(tmp_path: Path) -> None:
    run = write_lines(tmp_path / "run", step(1), epoch(1))
    (run / R.PREDICTIONS_FILE).write_bytes(b"\x00" * 100)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 2 and "is unreadable" in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in run.iterdir()) == [R.METRICS_FILE, R.PREDICTIONS_FILE]
