"""`mnist-dist bench`: its options and refusals (fast), a run on a small real slice, and every speed
option that applies to a CPU (proofs).

    pytest tests/test_bench.py            # the smoke run needs MNIST (MNIST_DATA_DIR); compiled runs dominate

The option test trains precision (no, bf16), channels_last and torch.compile, each alone and all
together, on synthetic digits with the same seed, and checks each against the plain fp32 run: the loss
follows the same path, and the saved weights (no `_orig_mod.` prefix) give the accuracy the run
reported when evaluated from the file.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from typer.testing import CliRunner

from mnist_dist import data as D
from mnist_dist.bench import OPTION_FIELDS, BenchOptions
from mnist_dist.cli import app
from mnist_dist.config import default_data_dir, from_preset, reference
from mnist_dist.evaluate import accuracy
from mnist_dist.model import Net
from mnist_dist.runfiles import read_metrics
from mnist_dist.trainer import train
from mnist_dist.weights import load_model

needs_mnist = pytest.mark.skipif(
    bool(D.missing_files(default_data_dir())), reason="MNIST not found (set MNIST_DATA_DIR)"
)


def flat(text: str) -> str:
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def test_bench_recipe_options_are_train_config_fields_on_the_reference_preset(tmp_path: Path) -> None:
    opts = BenchOptions(from_preset("reference", elastic=3.0, threads=1), max_train_samples=512, epochs=1)
    cfg = opts.train_config(str(tmp_path), "x")
    assert cfg == reference().replace(
        elastic=3.0,
        threads=1,
        max_train_samples=512,
        epochs=2,
        output_dir=str(tmp_path),
        name="x",
        wandb="disabled",
    )
    assert BenchOptions().recipe == reference()
    record = opts.record()
    assert record["preset"] == "reference" and record["elastic"] == 3.0 and record["rounds"] == 3
    assert set(OPTION_FIELDS) <= set(record)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--elastic", "-1"], "--elastic must be in [0, 100] pixels (0 = off), got -1.0"),
        (["--model", "resnet"], "--model must be one of net, net_wide, net_wider; got 'resnet'"),
        (
            ["--max-train-samples", "60000"],
            "--max-train-samples must be <= 50000 (the train split), got 60000",
        ),
        (["--batch-size", "abc"], "Invalid value for '--batch-size': 'abc' is not an integer"),
        (["--preset", "best"], "--preset must be one of reference, default; got 'best'"),
        (["--lr", "1"], "No such option: --lr"),  # bench times a step: the schedule is not its option
    ],
)
def test_bench_refuses_bad_options_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["bench", *args, "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 2, result.output
    assert message in flat(result.output) and "Traceback" not in result.output
    assert not (tmp_path / "b.json").exists()


@pytest.mark.proof
@needs_mnist
def test_bench_smoke(tmp_path: Path) -> None:
    """The CI smoke test: all three measurements run, and the JSON holds what docs/benchmarks.md quotes."""
    out = tmp_path / "bench.json"
    args = "bench --max-train-samples 512 --epochs 1 --steps 4 --warmup-steps 2 --rounds 1 --workers 1 --threads 1"
    result = CliRunner().invoke(
        app, [*args.split(), "--data-dir", str(default_data_dir()), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "loop / bare:" in result.output and "loop / conventional:" in result.output
    bench = json.loads(out.read_text())
    assert bench["device"] and bench["torch"] == torch.__version__
    assert bench["config"]["preset"] == "reference" and bench["config"]["batch_size"] == 128
    assert (bench["config"]["elastic"], bench["config"]["ema"]) == (0.0, 0.0)  # the step's costly options
    assert bench["train_samples"] == 512 and bench["steps_per_epoch"] == 4
    for kind in ("loop", "bare", "conventional"):
        (only,) = bench["results"][kind]["rounds"]
        assert only["images_per_second"] > 0 and only["warmup_seconds"] >= 0
    assert bench["results"]["bare"]["rounds"][0]["images"] == 4 * 128
    assert bench["results"]["conventional"]["rounds"][0]["images"] == 4 * 128
    assert bench["results"]["loop"]["rounds"][0]["images"] == 512  # the one timed epoch
    assert bench["ratios"]["loop_over_bare"] > 0 and bench["ratios"]["loop_over_conventional"] > 0
    assert bench["recipe"]["epochs"] == 19 and bench["recipe"]["seconds"]["loop"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's refusal of fp16")
def test_bench_refuses_fp16_on_cpu(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "--precision", "fp16", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 2
    assert "fp16" in result.output and not (tmp_path / "b.json").exists()


# ---------------------------------------------------------------------- speed options on the CPU
# Each option alone, and all three together: a compiled run costs a compilation, so the pairs of
# options are left to the all-together run.
COMBOS = [
    {"precision": p, "channels_last": c, "compile": k}
    for p, c, k in (
        ("no", False, False),
        ("bf16", False, False),
        ("no", True, False),
        ("no", False, True),
        ("bf16", True, True),
    )
]
FIRST_LOSS_TOL = 0.05


Run = tuple[dict[str, Any], list[float], Path]


def _run(root: Path, data: D.MNISTArrays, **options: Any) -> Run:
    """A 32-step reference-recipe run on synthetic digits (a higher peak LR, so it learns in 32
    steps): its summary, per-step losses and weights file."""
    cfg = from_preset(
        "reference", epochs=1, max_train_samples=1024, batch_size=32, max_lr=0.05, log_every=1,
        output_dir=str(root), name="run", wandb="disabled", **options,
    )  # fmt: skip
    summary = train(cfg, data=data)
    losses = [r["train/loss"] for r in read_metrics(root / "run") if r["kind"] == "step"]
    return summary, losses, root / "run" / "model.safetensors"


@pytest.fixture(scope="module")
def plain_fp32(tmp_path_factory: pytest.TempPathFactory, digits: D.MNISTArrays) -> Run:
    """The reference point of the option runs: fp32, eager, default memory format."""
    AcceleratorState._reset_state(reset_partial_state=True)
    return _run(tmp_path_factory.mktemp("plain"), digits, **COMBOS[0])


@pytest.fixture(scope="module")
def val_split(digits: D.MNISTArrays) -> D.DeviceSplit:
    return D.device_splits(digits, 0, torch.device("cpu"), max_train=1)["val"]


@pytest.mark.proof  # in-process on synthetic digits, but each compiled run costs a compilation
@pytest.mark.parametrize("options", COMBOS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_cpu_speed_options_train_and_evaluate(
    options: dict[str, Any], tmp_path: Path, plain_fp32: Run, val_split: D.DeviceSplit, digits: D.MNISTArrays
) -> None:
    summary, losses, weights = plain_fp32 if options == COMBOS[0] else _run(tmp_path, digits, **options)
    _, plain, _ = plain_fp32
    assert len(losses) == len(plain) == 32 and all(math.isfinite(x) for x in losses)
    # Same seed, init and batches: the first step computes the same loss as the plain fp32 run (up to
    # bf16 rounding and compiled dropout masks); later steps drift apart, as any change of numerics
    # makes them, but the run learns as well.
    assert abs(losses[0] - plain[0]) < FIRST_LOSS_TOL, (losses[0], plain[0])
    assert statistics.mean(losses[-8:]) < statistics.mean(losses[:8]) - 0.3, losses
    assert summary["val_acc"] > 0.2  # chance is 0.1
    assert summary["val_count"] == summary["test_count"] == len(val_split)
    # The weights file holds Net's own names (no `_orig_mod.`) and, loaded into a plain fp32 Net,
    # gives the validation accuracy the run reported.
    assert set(load_file(str(weights))) == set(Net().state_dict())
    # bf16 autocast evaluation rounds activations; a half-trained model's argmax is sensitive to it.
    tolerance = 0.02 if options["precision"] == "bf16" else 0.01
    reloaded = accuracy(load_model(weights, "net")[0], val_split, 2000)
    assert abs(reloaded - summary["val_acc"]) < tolerance, (reloaded, summary["val_acc"])
