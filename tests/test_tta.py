"""Test-time augmentation: the fixed views move pixels exactly, one identity view is the plain
evaluation to the byte, the views' probabilities (not their logits) are averaged, and `--tta` adds
labelled numbers to a training's summary and to `mnist-dist evaluate` without changing the plain ones.
The fast tests run on synthetic digits; the proof evaluates real MNIST through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from mnist_dist import data as D
from mnist_dist import spec
from mnist_dist.cli import app
from mnist_dist.config import TrainConfig, from_preset
from mnist_dist.evaluate import format_report, split_report
from mnist_dist.model import build_model
from mnist_dist.runfiles import WEIGHTS_FILE
from mnist_dist.trainer import train
from mnist_dist.weights import load_model

VIEWS = {v.name: v for v in spec.TTA_VIEWS}
TTA_KEYS = {"val_tta_acc", "val_tta_loss", "test_tta_acc", "test_tta_loss"}


def small(split: D.DeviceSplit, n: int = 100) -> D.DeviceSplit:
    return D.DeviceSplit(split.images[:n], split.labels[:n])


@pytest.fixture(scope="module")
def few(digits: D.MNISTArrays) -> D.MNISTArrays:
    """A fifth of the synthetic digits: 1,200 training images (1,000 train, 200 val), 200 test."""
    return D.MNISTArrays(
        digits.train_images[:1200],
        digits.train_labels[:1200],
        digits.test_images[:200],
        digits.test_labels[:200],
    )


@pytest.fixture(scope="module")
def splits(digits: D.MNISTArrays) -> dict[str, D.DeviceSplit]:
    return {k: small(s) for k, s in D.device_splits(digits, 0, torch.device("cpu"), max_train=1).items()}


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("net").eval()


# ---------------------------------------------------------------------- the views
def test_the_views_are_fixed_and_named() -> None:
    assert spec.TTA_LABEL == "TTA, 7 views"
    assert [(v.dx, v.dy, v.degrees) for v in spec.TTA_VIEWS] == [
        (0, 0, 0.0), (1, 0, 0.0), (-1, 0, 0.0), (0, 1, 0.0), (0, -1, 0.0), (0, 0, 5.0), (0, 0, -5.0),
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["shift right", "shift left", "shift down", "shift up"])
def test_a_shift_view_moves_every_pixel_by_one_and_fills_zeros(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(1, 256, (3, 1, 28, 28), generator=g, dtype=torch.uint8)  # no zero pixel
    v = VIEWS[name]
    moved = D.view(images, v) * D.STD + D.MEAN  # back to [0, 1]
    pixels = torch.round(moved * 255).to(torch.uint8)
    for r in range(28):
        for c in range(28):
            src_r, src_c = r - v.dy, c - v.dx
            inside = 0 <= src_r < 28 and 0 <= src_c < 28
            want = images[:, 0, src_r, src_c] if inside else torch.zeros(3, dtype=torch.uint8)
            assert torch.equal(pixels[:, 0, r, c], want), (name, r, c)
    assert torch.equal(D.view(images, v), D.normalize(pixels)), "exact: no resampling"


def test_the_rotations_turn_about_the_centre_in_opposite_directions() -> None:
    line = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    line[..., 14, :] = 200  # a horizontal line through the centre
    lit = {name: D.view(line, VIEWS[name])[0, 0] > 0 for name in ("rotate +5", "rotate -5")}
    plus, minus = lit["rotate +5"], lit["rotate -5"]
    assert plus[14, 13:15].all() and minus[14, 13:15].all(), "the centre stays"
    assert plus[13, 27] and plus[15, 0] and not plus[15, 27], "+5 raises the right end"
    assert minus[15, 27] and minus[13, 0] and not minus[13, 27], "-5 lowers it"
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (4, 1, 28, 28), generator=g, dtype=torch.uint8)
    mirrored = D.view(images.flip(-2), VIEWS["rotate +5"])
    assert torch.equal(mirrored, D.view(images, VIEWS["rotate -5"]).flip(-2)), "mirror images of each other"
    turned = torch.round((D.view(images, VIEWS["rotate +5"]) * D.STD + D.MEAN) * 255)
    allowed = torch.cat([images.flatten().float(), torch.zeros(1)]).unique()
    assert torch.isin(turned.unique(), allowed).all(), "nearest neighbour: only the input's values, or 0"


# ---------------------------------------------------------------------- the averaging
def test_the_identity_view_alone_is_the_plain_evaluation_exactly(
    net: torch.nn.Module, splits: dict[str, D.DeviceSplit]
) -> None:
    for split in splits.values():
        assert split_report(net, split, 64, [VIEWS["identity"]]) == split_report(net, split, 64)


class Constant(torch.nn.Module):
    """A model whose output ignores the image: TTA cannot change a thing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.linspace(0.0, 1.0, 10).flip(0).roll(3)  # predicts class 3
        return F.log_softmax(logits, 0).expand(len(x), 10)


def test_a_model_that_ignores_the_image_scores_the_same_with_tta(splits: dict[str, D.DeviceSplit]) -> None:
    plain = split_report(Constant(), splits["test"], 64)
    tta = split_report(Constant(), splits["test"], 64, spec.TTA_VIEWS)
    assert tta["acc"] == plain["acc"] == int((splits["test"].labels == 3).sum()) / len(splits["test"])
    assert tta["confusion"] == plain["confusion"]
    assert tta["loss"] == pytest.approx(plain["loss"], rel=1e-6)


class Probe(torch.nn.Module):
    """Class 0 scores ``bias + weak * pixel (14, 14)``, class 1 ``strong * pixel (14, 15)``; the other
    classes score 0. A single lit pixel at (14, 14) reaches (14, 15) only in the shift-right view."""

    def __init__(self, bias: float, weak: float, strong: float) -> None:
        super().__init__()
        self.bias, self.weak, self.strong = bias, weak, strong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x[:, 0] * D.STD + D.MEAN
        logits = torch.zeros(len(x), 10)
        logits[:, 0] = self.bias + self.weak * u[:, 14, 14]
        logits[:, 1] = self.strong * u[:, 14, 15]
        return F.log_softmax(logits, 1)


def dot() -> D.DeviceSplit:
    images = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    images[..., 14, 14] = 255
    return D.DeviceSplit(images, torch.tensor([1]))


def test_one_confident_view_changes_the_prediction() -> None:
    probe = Probe(bias=0.0, weak=1.0, strong=50.0)
    assert split_report(probe, dot(), 8)["acc"] == 0.0, "plain: class 0 (weakly)"
    assert split_report(probe, dot(), 8, [VIEWS["shift right"]])["acc"] == 1.0
    assert split_report(probe, dot(), 8, [VIEWS["shift left"]])["acc"] == 0.0, "the pixel moved the other way"
    tta = split_report(probe, dot(), 8, spec.TTA_VIEWS)
    assert tta["acc"] == 1.0 and tta["confusion"][1][1] == 1
    # mean probability of class 1: three views see the dot unmoved, one sees it at (14, 15), three see no lit pixel
    p1_unmoved = 1 / (torch.e + 9)
    want = torch.tensor((3 * p1_unmoved + 1 + 3 * 0.1) / 7).log().item()
    assert tta["loss"] == pytest.approx(-want, rel=1e-5)


def test_probabilities_are_averaged_not_logits() -> None:
    """Class 1 is certain in one view of seven, class 0 fairly sure in the other six: the mean of the
    probabilities picks class 0, a mean of the logits would pick class 1 (60 / 7 > 3)."""
    probe = Probe(bias=3.0, weak=0.0, strong=60.0)
    assert split_report(probe, dot(), 8, [VIEWS["shift right"]])["acc"] == 1.0
    assert split_report(probe, dot(), 8, spec.TTA_VIEWS)["confusion"][1] == [1] + [0] * 9


def test_the_report_shows_plain_and_tta_lines_labelled(
    net: torch.nn.Module, splits: dict[str, D.DeviceSplit]
) -> None:
    result: dict[str, Any] = {"model": "net", "split_seed": 0, "tta_views": list(VIEWS)}
    for name in ("val", "test"):
        result[name] = split_report(net, splits[name], 64)
        result[f"{name}_tta"] = split_report(net, splits[name], 64, spec.TTA_VIEWS)
    lines = format_report(result).splitlines()
    assert lines[:4] == [
        f"val  {100 * result['val']['acc']:.2f}%  (100 images, split seed 0)",
        f"test {100 * result['test']['acc']:.2f}%  (100 images)",
        f"val (TTA, 7 views)  {100 * result['val_tta']['acc']:.2f}%  (100 images)",
        f"test (TTA, 7 views) {100 * result['test_tta']['acc']:.2f}%  (100 images)",
    ]
    del result["val_tta"], result["test_tta"]
    assert format_report(result).splitlines()[2] == "", "without TTA the report is as before"


# ---------------------------------------------------------------------- training
def tiny(tmp: Path, name: str, **changes: Any) -> TrainConfig:
    return from_preset(
        "reference", epochs=1, max_train_samples=512, output_dir=str(tmp), name=name, wandb="disabled",
        threads=1, deterministic=True, **changes,
    )  # fmt: skip


def test_a_training_with_tta_adds_the_four_numbers_and_changes_nothing_else(
    tmp_path: Path, few: D.MNISTArrays, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = train(tiny(tmp_path, "plain"), data=few)
    capsys.readouterr()
    tta = train(tiny(tmp_path, "tta", tta=True), data=few)
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")]
    assert not any("tta" in key for key in plain)
    assert tta.keys() >= TTA_KEYS
    saved = json.loads((tmp_path / "tta" / "summary.json").read_text())
    assert {k: saved[k] for k in TTA_KEYS} == {k: tta[k] for k in TTA_KEYS}
    varying = {"wall_seconds", "train_seconds", "train_images_per_second", "run_dir", *TTA_KEYS}
    assert {k: v for k, v in tta.items() if k not in varying} == {
        k: v for k, v in plain.items() if k not in varying
    }, "plain numbers unchanged"
    assert (tmp_path / "tta" / WEIGHTS_FILE).read_bytes() == (tmp_path / "plain" / WEIGHTS_FILE).read_bytes()
    model = load_model(tmp_path / "tta")[0].eval()
    for name, split in D.device_splits(few, 0, torch.device("cpu"), max_train=1).items():
        if name == "train":
            continue
        again = split_report(model, split, 500, spec.TTA_VIEWS)  # in one process, the run's weights
        assert again["count"] == tta[f"{name}_count"] == len(split)
        assert tta[f"{name}_tta_acc"] == again["acc"]
        assert tta[f"{name}_tta_loss"] == pytest.approx(again["loss"], rel=1e-5)
    assert done and f"val (TTA, 7 views) {100 * tta['val_tta_acc']:.2f}%" in done[0]
    assert f"test (TTA, 7 views) {100 * tta['test_tta_acc']:.2f}%" in done[0]


# ---------------------------------------------------------------------- proof
@pytest.fixture(scope="module")
def weights(few_step_run: Path) -> Path:
    return few_step_run


@pytest.mark.proof
def test_evaluate_tta_reports_both_numbers_labelled_in_json_and_its_report(
    weights: Path, data_root: Path
) -> None:
    out = CliRunner().invoke(app, ["evaluate", str(weights), "--tta", "--data-dir", str(data_root), "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["tta_views"] == list(VIEWS)
    for name in ("val", "test"):
        plain, tta = result[name], result[f"{name}_tta"]
        assert plain["count"] == tta["count"] == 10_000
        assert tta["acc"] == sum(c["correct"] for c in tta["per_class"]) / 10_000
        assert tta["confusion"] != plain["confusion"], "these hesitant weights see the views differently"
    # The text the command prints without --json is this report (one real TTA evaluation is enough).
    assert format_report(result).splitlines()[:4] == [
        f"val  {100 * result['val']['acc']:.2f}%  (10,000 images, split seed 0)",
        f"test {100 * result['test']['acc']:.2f}%  (10,000 images)",
        f"val (TTA, 7 views)  {100 * result['val_tta']['acc']:.2f}%  (10,000 images)",
        f"test (TTA, 7 views) {100 * result['test_tta']['acc']:.2f}%  (10,000 images)",
    ]
