"""`mnist-dist evaluate` in full, in-process on the real MNIST files: accuracy, per-class accuracy and
the confusion counts of both splits come from the same predictions, and the text shows what the JSON
holds. One evaluation serves every test (it reads 20,000 images)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from mnist_dist import data as D
from mnist_dist.cli import app
from mnist_dist.evaluate import accuracy, format_report
from mnist_dist.model import build_model
from mnist_dist.weights import load_model


@pytest.fixture(scope="module")
def run(few_step_run: Path) -> Path:
    return few_step_run


@pytest.fixture(scope="module")
def result(run: Path, data_root: Path) -> dict[str, Any]:
    out = CliRunner().invoke(app, ["evaluate", str(run), "--json", "--data-dir", str(data_root)])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


def test_per_class_and_confusion_counts_add_up_to_the_accuracy(
    result: dict[str, Any], run: Path, mnist: D.MNISTArrays
) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where evaluate measures
    splits = D.device_splits(mnist, 0, device, max_train=1)
    assert result["model"] == "net" and result["split_seed"] == 0
    for name in ("val", "test"):
        split, report = splits[name], result[name]
        counts = torch.tensor(report["confusion"])
        assert counts.shape == (10, 10) and int(counts.sum()) == report["count"] == len(split)
        per_class = report["per_class"]
        assert [c["class"] for c in per_class] == list(range(10))
        assert [c["count"] for c in per_class] == counts.sum(1).tolist()
        assert [c["count"] for c in per_class] == torch.bincount(split.labels.cpu(), minlength=10).tolist()
        assert [c["correct"] for c in per_class] == counts.diag().tolist()
        assert report["acc"] == sum(c["correct"] for c in per_class) / report["count"]
        assert all(c["acc"] == c["correct"] / c["count"] for c in per_class)
        assert (counts.sum(0) > 0).sum() > 1, "the fixture's weights should predict several classes"
    assert result["test"]["acc"] == accuracy(load_model(run)[0].to(device), splits["test"], 2000)


def test_the_text_shows_what_the_json_holds(result: dict[str, Any]) -> None:
    lines = format_report(result).splitlines()
    val, test = result["val"], result["test"]
    assert lines[0] == f"val  {100 * val['acc']:.2f}%  (10,000 images, split seed 0)"
    assert lines[1] == f"test {100 * test['acc']:.2f}%  (10,000 images)"
    rows = [line.split() for line in lines[4:14]]
    for row, v, t in zip(rows, val["per_class"], test["per_class"], strict=True):
        assert row == [
            str(v["class"]),
            f"{100 * v['acc']:.2f}%",
            f"{v['correct']:,}/{v['count']:,}",
            f"{100 * t['acc']:.2f}%",
            f"{t['correct']:,}/{t['count']:,}",
        ]
    header = lines.index("test confusion counts (rows: true digit, columns: predicted)")
    assert lines[header + 1].split() == [str(p) for p in range(10)]
    matrix = [[int(n.replace(",", "")) for n in line.split()[1:]] for line in lines[header + 2 :]]
    assert matrix == test["confusion"]


def test_a_file_of_neither_layout_names_its_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = dict(build_model("net").state_dict())
    del state["convblock1.0.weight"]
    state["head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "odd.pt")
    out = CliRunner().invoke(app, ["evaluate", str(tmp_path / "odd.pt")])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "missing keys: convblock1.0.weight" in out.stderr and "unexpected keys: head.weight" in out.stderr
