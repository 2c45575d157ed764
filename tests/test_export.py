"""`mnist-dist export`: each format is written, loads the way a user loads it, takes any batch size
and reproduces PyTorch; a check that fails leaves no file; every refusal is one line with exit 2.
The fast tests export weights trained in-process on synthetic digits; the proof does the same on real
MNIST and checks the 10,000 test images."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from mnist_dist import data as D
from mnist_dist import export as E
from mnist_dist.cli import app
from mnist_dist.config import from_preset
from mnist_dist.model import build_model
from mnist_dist.trainer import train
from mnist_dist.weights import load_model

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


def trained_run(root: Path, data: D.MNISTArrays, samples: int, **changes: Any) -> dict[str, Any]:
    """The summary of one short epoch of the reference preset, trained in this process."""
    cfg = from_preset(
        "reference", epochs=1, max_train_samples=samples, output_dir=str(root), name="run",
        wandb="disabled", threads=1, **changes,
    )  # fmt: skip
    return train(cfg, data=data)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, digits: D.MNISTArrays) -> Path:
    return Path(trained_run(tmp_path_factory.mktemp("export"), digits, samples=1024)["run_dir"])


@pytest.fixture
def synthetic_files(monkeypatch: pytest.MonkeyPatch, digits: D.MNISTArrays) -> None:
    """The CLI reads the synthetic digits where it would read the MNIST files."""
    monkeypatch.setattr(D, "load_mnist", lambda root, allow_download=True: digits)


def user_runner(fmt: str, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The file loaded as docs/export.md tells a user to, independent of the module's own loaders."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path))
        return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    return torch.export.load(str(path)).module()


def needs(fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")


def no_stray_files(folder: Path) -> None:
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")], list(folder.iterdir())


@pytest.mark.parametrize("fmt", list(E.FORMATS))
def test_each_format_loads_takes_any_batch_and_matches_pytorch(
    run_dir: Path, digits: D.MNISTArrays, fmt: str
) -> None:
    needs(fmt)
    result = E.export_model(run_dir, fmt, data=digits)
    assert result.path == run_dir / f"model{E.FORMATS[fmt].suffix}"
    assert 0 < result.path.stat().st_size == result.bytes < 256 * 1024  # the weights, not the sample images
    assert result.max_diff <= E.TOLERANCE and result.images == len(digits.test_labels)
    assert result.batch_sizes == (1000, 333, 1)  # 1,000 test images in batches of 1000, 333 (and 1)
    net, _ = load_model(run_dir)
    run = user_runner(fmt, result.path)
    for n in (7, 64):  # sizes the check did not run
        x = D.normalize(digits.test_images[:n].unsqueeze(1))
        with torch.no_grad():
            assert torch.allclose(run(x), net.eval()(x), atol=E.TOLERANCE, rtol=0)
    no_stray_files(run_dir)
    assert str(result.path) in result.how_to_load() and f"{D.MEAN}" in result.how_to_load()


def test_the_cli_prints_the_check_and_how_to_load(
    run_dir: Path, tmp_path: Path, synthetic_files: None
) -> None:
    out = tmp_path / "net.pt2"
    result = CliRunner().invoke(
        app, ["export", str(run_dir), "--format", "exported-program", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    check, load = result.stdout.splitlines()
    assert check.startswith(f"exported-program: {out} (") and "max abs diff" in check, check
    assert check.endswith("on 1,000 test images, batch sizes 1000, 333, 1"), check
    assert load.startswith(f"load: torch.export.load('{out}').module()(x)"), load


def test_an_existing_file_is_replaced_only_with_force(
    run_dir: Path, tmp_path: Path, digits: D.MNISTArrays
) -> None:
    out = tmp_path / "mine.pt"
    out.write_bytes(b"keep me")
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "torchscript", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"{out} already exists; pass --force" in result.stderr
    assert out.read_bytes() == b"keep me"
    E.export_model(run_dir, "torchscript", out, force=True, data=digits)
    assert user_runner("torchscript", out)(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_a_failing_check_removes_the_export_and_exits_1(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_files: None
) -> None:
    """An exporter that gets the weights wrong (here: one layer scaled by 2) is caught, its file removed;
    a file it was to replace (--force) stays as it was."""
    real = E.FORMATS["exported-program"]

    def wrong_weights(net: torch.nn.Module, sample: torch.Tensor, path: Path) -> None:
        broken = copy.deepcopy(net)
        with torch.no_grad():
            broken.convblock6[0].weight.mul_(2)
        real.write(broken, sample, path)

    monkeypatch.setitem(E.FORMATS, "exported-program", dataclasses.replace(real, write=wrong_weights))
    fresh, kept = tmp_path / "fresh.pt2", tmp_path / "kept.pt2"
    kept.write_bytes(b"previous export")
    for out, extra in ((fresh, []), (kept, ["--force"])):
        args = ["export", str(run_dir), "--format", "exported-program", "--out", str(out), *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        assert "does not reproduce PyTorch: max abs diff" in result.stderr, result.stderr
        assert f"{out} was not written" in result.stderr and "Traceback" not in result.output
    assert not fresh.exists() and kept.read_bytes() == b"previous export"
    no_stray_files(tmp_path)


def test_onnx_without_the_extra_says_what_to_install(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "needs onnxruntime, which is not installed: pip install -e '.[export]'" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unreadable_mnist_files_exit_1_with_the_data_message(run_dir: Path, tmp_path: Path) -> None:
    raw = D.raw_dir(tmp_path)
    raw.mkdir(parents=True)
    for name in D.missing_files(tmp_path):
        (raw / name).write_bytes(b"not MNIST")
    out = tmp_path / "m.pt2"
    args = [
        "export",
        str(run_dir),
        "--format",
        "exported-program",
        "--out",
        str(out),
        "--data-dir",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "train-images-idx3-ubyte.gz is corrupt or truncated" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["{tmp}/missing", "--format", "torchscript"], "{tmp}/missing does not exist"),
        (
            ["{run}", "--format", "tflite"],
            "--format must be one of onnx, torchscript, exported-program; got 'tflite'",
        ),
        (["{run}", "--format", "torchscript", "--model", "resnet"], "model 'resnet' is not one of"),
        (["{run}", "--format", "torchscript", "--out", "{tmp}/m.onnx"], "must end in .pt for this format"),
        (["{run}", "--format", "torchscript", "--out", "{tmp}/no/m.pt"], "folder {tmp}/no does not exist"),
    ],
    ids=["missing-weights", "bad-format", "bad-model", "wrong-suffix", "no-folder"],
)
def test_refusals_are_one_line_with_exit_2(run_dir: Path, tmp_path: Path, args: list[str], says: str) -> None:
    filled = [a.format(tmp=tmp_path, run=run_dir) for a in args]
    result = CliRunner().invoke(app, ["export", *filled])
    assert result.exit_code == 2, result.output
    assert says.format(tmp=tmp_path, run=run_dir) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_the_weights_file_itself_is_never_the_output(tmp_path: Path) -> None:
    """A state dict named model.pt would be its own TorchScript default: refused, not overwritten."""
    weights = tmp_path / "model.pt"
    torch.save(build_model("net").state_dict(), weights)
    before = weights.read_bytes()
    with pytest.raises(E.ExportError, match="is the weights file being exported"):
        E.export_model(weights, "torchscript", force=True)
    assert weights.read_bytes() == before


@pytest.mark.proof
def test_every_format_reproduces_pytorch_on_the_real_test_set(
    real_run: tuple[Path, dict], mnist: D.MNISTArrays, data_root: Path, tmp_path: Path
) -> None:
    """Weights from a short real run; each export checked on the 10,000 MNIST test images."""
    pytest.importorskip("onnxruntime")  # CI installs the export extra: this proves all three formats
    run = tmp_path / "run"
    shutil.copytree(real_run[0], run)  # the exports are written beside the weights
    for fmt in E.FORMATS:
        result = E.export_model(run, fmt, data=mnist)
        print(result.line())
        assert result.images == 10_000 and result.max_diff <= E.TOLERANCE, result
        assert result.batch_sizes == (1000, 333, 10, 1)
    out = tmp_path / "from-the-files.pt2"  # the command reads the MNIST files itself
    args = [
        "export",
        str(run),
        "--format",
        "exported-program",
        "--out",
        str(out),
        "--data-dir",
        str(data_root),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "on 10,000 test images, batch sizes 1000, 333, 10, 1" in result.stdout
