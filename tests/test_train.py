"""A real training on the real data, in-process: a short reference run must learn, its folder holds
what the README says, and `mnist-dist evaluate` reads its weights back to the accuracy it reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mnist_dist import runfiles
from mnist_dist.cli import app
from mnist_dist.model import Net

pytestmark = pytest.mark.proof


@pytest.fixture(scope="module")
def short_run(real_run: tuple[Path, dict]) -> Path:
    return real_run[0]


def test_short_real_run_learns(short_run: Path) -> None:
    summary = json.loads((short_run / runfiles.SUMMARY_FILE).read_text())
    # 250 steps of the reference recipe on 16,000 images: a broken pipeline cannot get here.
    assert summary["val_acc"] >= 0.90 and summary["test_acc"] >= 0.90, summary
    assert summary["val_count"] == summary["test_count"] == 10_000
    assert summary["params"] == 8440 and summary["world_size"] == 1 and summary["epochs"] == 2
    for key in ("best_epoch", "precision", "device", "wall_seconds", "train_images_per_second"):
        assert key in summary


def test_run_folder_holds_config_metrics_and_weights(short_run: Path) -> None:
    config = json.loads((short_run / runfiles.CONFIG_FILE).read_text())
    assert config["preset"] == "reference" and config["max_train_samples"] == 16_000
    epochs = [r for r in runfiles.read_metrics(short_run) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[-1]["val_acc"] == json.loads((short_run / runfiles.SUMMARY_FILE).read_text())["val_acc"]
    Net().load_state_dict(load_file(str(short_run / runfiles.WEIGHTS_FILE)), strict=True)


@pytest.mark.parametrize("target", ["folder", "weights", "reference-pt"])
def test_evaluate_reproduces_the_run_summary(short_run: Path, tmp_path: Path, target: str) -> None:
    """The run folder, its model.safetensors, and the same weights as a reference-design .pt file:
    the same accuracies and, to the bit, the same losses (evaluate runs the model in the training's
    memory format)."""
    summary = json.loads((short_run / runfiles.SUMMARY_FILE).read_text())
    path = {"folder": short_run, "weights": short_run / runfiles.WEIGHTS_FILE}.get(target)
    if path is None:
        path = tmp_path / "reference.pt"
        torch.save(load_file(str(short_run / runfiles.WEIGHTS_FILE)), path)
    result = CliRunner().invoke(app, ["evaluate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"val  {100 * summary['val_acc']:.2f}%" in result.output
    assert f"test {100 * summary['test_acc']:.2f}%" in result.output
    measured = json.loads(CliRunner().invoke(app, ["evaluate", str(path), "--json"]).stdout)
    for split in ("val", "test"):
        assert (measured[split]["acc"], measured[split]["loss"]) == (
            summary[f"{split}_acc"],
            summary[f"{split}_loss"],
        )
