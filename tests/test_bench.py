"""`mnist-dist bench`: its options and refusals, how it picks the fastest variant, and `--profile`
traces of the real loop (fast); a bench run on a small real slice, `train --profile`, the GPU script
in its tiny CPU mode, and every speed option that applies to a CPU (proofs).

    pytest tests/test_bench.py            # the smoke runs need MNIST (MNIST_DATA_DIR); compiled runs dominate

The option test trains precision (no, bf16), channels_last and torch.compile, each alone and all
together, on synthetic digits with the same seed, and checks each against the plain fp32 run: the loss
follows the same path, and the saved weights (no `_orig_mod.` prefix) give the accuracy the run
reported when evaluated from the file.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from typer.testing import CliRunner

from mnist_dist import data as D
from mnist_dist import spec
from mnist_dist.bench import ProfileSteps, _results
from mnist_dist.bench_options import OPTION_FIELDS, PROFILE_SKIP, BenchOptions
from mnist_dist.cli import app
from mnist_dist.config import default_data_dir, from_preset, reference
from mnist_dist.evaluate import accuracy
from mnist_dist.model import Net
from mnist_dist.runfiles import read_metrics
from mnist_dist.trainer import train
from mnist_dist.weights import load_model

from .helpers import REPO, clean_env, started

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
        (
            ["--model", "resnet"],
            "--model must be one of net, net_wide, net_wider, net_w24x23, net_w8x25; got 'resnet'",
        ),
        (
            ["--max-train-samples", "60000"],
            "--max-train-samples must be <= 50000 (the train split), got 60000",
        ),
        (["--batch-size", "abc"], "Invalid value for '--batch-size': 'abc' is not an integer"),
        (["--preset", "best"], "--preset must be one of reference, default; got 'best'"),
        (["--lr", "1"], "No such option: --lr"),  # bench times a step: the schedule is not its option
        (["--workers", "0,x"], "--workers must be comma-separated ints; got '0,x'"),
        (["--workers", "2,-1"], "--workers must list integers >= 0 like 0,1,2, each once; got '2,-1'"),
        (["--workers", "1,1"], "--workers must list integers >= 0 like 0,1,2, each once; got '1,1'"),
        (
            ["--bare", "eager,jit"],
            "--bare must list names from eager, channels_last, compile, compile+channels_last",
        ),
        (["--profile", "0"], "Invalid value for '--profile'"),
    ],
)
def test_bench_refuses_bad_options_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["bench", *args, "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 2, result.output
    assert message in flat(result.output) and "Traceback" not in result.output
    assert not (tmp_path / "b.json").exists()


def _round(ips: float, cpu: float | None = None) -> dict[str, Any]:
    """One round's result as the measurements write it (one chunk)."""
    return {"images_per_second": ips, "best_images_per_second": ips, "images_per_cpu_second": cpu,
            "warmup_seconds": 0.5}  # fmt: skip


def test_each_group_is_compared_at_its_fastest_variant_round_by_round() -> None:
    rounds = {
        "loop": [_round(1000, 500), _round(900, 450), _round(1100, 550)],
        "bare:eager": [_round(1000, 400), _round(1000, 400), _round(1000, 400)],
        "bare:compile": [_round(2000, 1000), _round(1800, 900), _round(2200, 1100)],
        "conventional:0_workers": [_round(500), _round(450), _round(550)],
        "conventional:2_workers": [_round(400), _round(600), _round(300)],
    }
    out = _results(rounds, torch.device("cpu"), reference())
    # Medians pick the fastest: one fast round does not make 2 workers the baseline.
    assert out["best"] == {"bare": "bare:compile", "conventional": "conventional:0_workers"}
    against = out["ratios"]["bare:compile"]
    assert against["rounds"] == [0.5, 0.5, 0.5] and against["median"] == 0.5  # each round with its pair
    assert against["best_epochs"] == 1100 / 2200 and against["cpu_time"] == 0.5
    assert out["ratios"]["bare:eager"]["median"] == 1.0 and out["ratios"]["bare:eager"]["cpu_time"] == 1.25
    assert out["ratios"]["conventional:0_workers"]["median"] == 2.0
    assert "cpu_time" not in out["ratios"]["conventional:0_workers"]  # its workers' CPU time is not known
    assert out["recipe"]["seconds"]["loop"] == 19 * spec.N_TRAIN / 1000 + 0.5


def _trace(path: Path) -> tuple[list[str], set[str]]:
    """The profiler steps a Chrome trace holds, in order, and the names of its events."""
    events = json.loads(path.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    steps = sorted((n for n in names if n.startswith("ProfilerStep#")), key=lambda n: int(n.split("#")[1]))
    return steps, names


def test_profile_traces_the_real_loops_steps_after_the_warm_up(tmp_path: Path, digits: D.MNISTArrays) -> None:
    hook = ProfileSteps(5)
    cfg = from_preset(
        "reference", epochs=1, max_train_samples=32 * ProfileSteps.steps_needed(5), batch_size=32, threads=1,
        output_dir=str(tmp_path), name="p", wandb="disabled",
    )  # fmt: skip
    train(cfg, data=digits, hooks=[hook])
    assert hook.path == tmp_path / "p" / "profile" / "loop.pt.trace.json"
    steps, names = _trace(hook.path)
    # Profiler step k spans optimizer step k + 1: exactly the 5 steps after the untraced ones.
    assert steps == [f"ProfilerStep#{k}" for k in range(PROFILE_SKIP, PROFILE_SKIP + 5)]
    assert hook.traced() == f"optimizer steps {PROFILE_SKIP + 1}-{PROFILE_SKIP + 5}"
    assert {"aten::convolution", "aten::convolution_backward", "aten::max_pool2d_with_indices"} <= names
    assert any("Optimizer.step" in n for n in names)  # the whole step, not just the model


def test_train_refuses_a_profile_its_run_cannot_hold(tmp_path: Path) -> None:
    base = ["train", "--preset", "reference", "--output-dir", str(tmp_path), "--data-dir", str(tmp_path)]
    short = CliRunner().invoke(
        app, [*base, "--max-train-samples", "1024", "--epochs", "1", "--profile", "10"]
    )
    assert short.exit_code == 2 and "Traceback" not in short.output
    assert (
        f"--profile 10 traces optimizer steps {PROFILE_SKIP + 1}-{PROFILE_SKIP + 10} and needs "
        f"{PROFILE_SKIP + 11} steps; this run has 8" in flat(short.output)
    )
    ranks = CliRunner().invoke(app, [*base, "--processes", "2", "--profile", "3"])
    assert ranks.exit_code == 2 and "--profile traces one process; this run has 2" in flat(ranks.output)
    assert list(tmp_path.iterdir()) == []  # no run folder


@pytest.mark.proof
@needs_mnist
def test_bench_smoke(tmp_path: Path) -> None:
    """The CI smoke test of bench: every kind of measurement runs, the JSON holds what
    docs/benchmarks.md quotes, and --profile writes a trace of the loop beside it."""
    out = tmp_path / "bench.json"
    args = (
        "bench --max-train-samples 512 --epochs 1 --steps 4 --warmup-steps 2 --rounds 1 --threads 1 "
        "--workers 0,1 --bare eager,channels_last --profile 2"
    )
    result = CliRunner().invoke(
        app, [*args.split(), "--data-dir", str(default_data_dir()), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    bench = json.loads(out.read_text())
    best = bench["best"]
    assert f"loop / fastest {best['bare'].replace(':', ' step: ')}:" in result.output
    assert bench["device"] and bench["torch"] == torch.__version__
    assert bench["config"]["preset"] == "reference" and bench["config"]["batch_size"] == 128
    assert (bench["config"]["elastic"], bench["config"]["ema"]) == (0.0, 0.0)  # the step's costly options
    assert bench["train_samples"] == 512 and bench["steps_per_epoch"] == 4
    kinds = ["loop", "bare:eager", "bare:channels_last", "conventional:0_workers", "conventional:1_workers"]
    assert list(bench["results"]) == kinds
    for kind in kinds:
        (only,) = bench["results"][kind]["rounds"]
        assert only["images_per_second"] > 0 and only["warmup_seconds"] >= 0
        assert only["images"] == (512 if kind == "loop" else 4 * 128)  # the loop: its one timed epoch
        assert kind == "loop" or bench["ratios"][kind]["median"] > 0
    assert bench["bare_variants"]["channels_last"] == {"compile": False, "channels_last": True}
    assert best["bare"].startswith("bare:") and best["conventional"].startswith("conventional:")
    assert bench["recipe"]["epochs"] == 19 and bench["recipe"]["seconds"]["loop"] > 0
    trace = tmp_path / "bench.pt.trace.json"
    assert bench["profile"] == {"steps": 2, "trace": str(trace)}
    assert len(_trace(trace)[0]) == 2


@pytest.mark.proof
@needs_mnist
def test_train_profile_writes_its_trace_into_the_run_folder(tmp_path: Path) -> None:
    args = "train --preset reference --max-train-samples 2048 --epochs 1 --threads 1 --wandb disabled --profile 3"
    result = CliRunner().invoke(app, [*args.split(), "--output-dir", str(tmp_path), "--name", "p"])
    assert result.exit_code == 0, result.output
    trace = tmp_path / "p" / "profile" / "loop.pt.trace.json"
    assert f"wrote a trace of optimizer steps {PROFILE_SKIP + 1}-{PROFILE_SKIP + 3}: {trace}" in result.output
    assert len(_trace(trace)[0]) == 3


@pytest.mark.proof
@needs_mnist
def test_gpu_script_runs_every_step_in_its_tiny_cpu_mode(tmp_path: Path) -> None:
    """CI's smoke run of .ci/gpu_check.sh: each step's command line works (a GPU run finds out
    nothing about the script itself), and it keeps what it says it keeps."""
    env = clean_env(OUT=str(tmp_path / "out"), GPU_CHECK_TINY="1", GPU_CHECK_BUDGET="3000")
    script = ["bash", str(REPO / ".ci/gpu_check.sh"), str(default_data_dir())]
    with started(script, tmp_path, tmp_path / "stdout.txt", env) as proc:
        assert proc.wait(timeout=900) == 0, (tmp_path / "stdout.txt").read_text()
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    results = re.findall(r"^=== (.+): exit (\d+) after", log, flags=re.M)
    assert results and all(rc == "0" for _, rc in results), log
    ran = {name for name, _ in results}
    assert {"bench fp32", "bench bf16", "train reference-fp32", "train default-bf16"} <= ran, log
    skipped = re.findall(r"^=== (.+): SKIPPED \((.+)\)$", log, flags=re.M)
    assert all("not available" in why or "tiny CPU mode" in why for _, why in skipped), skipped  # not budget
    assert {"graph capture", "bench graph"} <= {name for name, _ in skipped}, log
    for name in ran:
        kind, _, what = name.partition(" ")
        kept = f"{kind}-{what}.json"
        assert (tmp_path / "out" / kept).is_file(), (kept, log)
    assert "device:" in (tmp_path / "out" / "env.txt").read_text()


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
