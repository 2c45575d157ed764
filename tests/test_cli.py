"""Every value a user can get wrong is refused before any work, with exit code 2, a message that
names the value and what is allowed, no traceback and no run folder left behind. In-process, except
the two proofs that start the real command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mnist_dist.cli import app

from .helpers import clean_env, cli

BAD = [
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--batch-size", "abc"], "Invalid value for '--batch-size': 'abc' is not an integer"),
    (["--precision", "fp8"], "--precision must be one of no, bf16, fp16; got 'fp8'"),
    (["--precision", "fp16"], "--precision fp16 needs a GPU"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--max-lr", "-1"], "--max-lr must be > 0, got -1.0"),
    (["--pct-start", "1.0"], "--pct-start must be strictly between 0 and 1, got 1.0"),
    (["--elastic", "-1"], "--elastic must be in [0, 100] pixels (0 = off), got -1.0"),
    (["--data-dir", "/no/such/dir"], "--data-dir '/no/such/dir' does not exist"),
    (["--preset", "best"], "--preset must be one of reference, default; got 'best'"),
    (
        ["--model", "resnet"],
        "--model must be one of net, net_wide, net_wider, net_w24x23, net_w8x25; got 'resnet'",
    ),
    (["--max-train-samples", "60000"], "--max-train-samples must be <= 50000"),
    (["--processes", "2", "--global-batch-size", "255"], "must be a multiple of processes x grad-accum"),
    (["--nodes", "2", "--node-rank", "2", "--main-port", "29511"], "--node-rank must be in 0..1, got 2"),
    (["--nodes", "2"], "--main-port is required with --nodes > 1"),
    (
        ["--max-train-samples", "128", "--epochs", "5", "--pct-start", "0.2"],
        "--pct-start 0.2 of 5 steps is a one-step warm-up, which OneCycleLR cannot schedule",
    ),
    (["--processes", "2", "--max-train-samples", "1"], "--max-train-samples 1 is fewer than the 2 processes"),
    (["--processes", "2", "--sync-bn"], "--sync-bn needs GPUs: SyncBatchNorm has no CPU implementation"),
]
if torch.cuda.is_available():  # GPUs run fp16 and SyncBatchNorm
    BAD = [(args, message) for args, message in BAD if "GPU" not in message]


def flat(text: str) -> str:
    """Typer's error panel wraps lines in box characters: compare the words alone."""
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_refused_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["train", "--output-dir", str(tmp_path / "runs"), *args])
    assert result.exit_code == 2, result.output
    assert message in flat(result.output)
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.proof
def test_refusal_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    result = cli("train", "--epochs", "-3", "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--epochs must be a positive integer, got -3" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_run_folder_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["train", "--output-dir", str(tmp_path), "--name", "exp"])
    assert result.exit_code == 2
    assert "already exists" in result.output
    assert (tmp_path / "exp" / "keep.txt").read_text() == "mine"


@pytest.mark.proof
def test_train_entry_points_share_the_same_options() -> None:
    a = cli("train", "--help", env={"COLUMNS": "200"})
    b = subprocess.run(
        [sys.executable, "-m", "mnist_dist.train", "--help"],
        capture_output=True, text=True, env=clean_env(COLUMNS="200"), timeout=120,
    )  # fmt: skip
    assert a.returncode == 0 and b.returncode == 0, b.stderr

    def options(text: str) -> set[str]:
        return {w.strip("│,") for w in text.split() if w.startswith("--")}

    assert options(a.stdout) == options(b.stdout)
    assert {
        "--epochs",
        "--max-train-samples",
        "--processes",
        "--preset",
        "--config",
        "--print-config",
    } <= options(a.stdout)


# Every command's help, asked for in one fresh interpreter; then which heavy modules it imported.
HELP_PROBE = """
import sys
from typer.main import get_command
from mnist_dist.cli import app
for name in [None, *get_command(app).commands]:
    try:
        app([name, "--help"] if name else ["--help"], prog_name="mnist-dist")
    except SystemExit as e:
        assert e.code == 0, (name, e.code)
print(sorted(m for m in ("torch", "torchvision", "accelerate", "wandb", "matplotlib") if m in sys.modules))
"""


def test_help_answers_without_importing_torch() -> None:
    """``--help`` and typer's own refusals must answer at once: no command's help may load torch
    (about 3 s) or the other heavy packages; they load only when a command runs."""
    result = subprocess.run(
        [sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, env=clean_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--epochs" in result.stdout and "--tta" in result.stdout  # the helps were really printed
    assert result.stdout.splitlines()[-1] == "[]"
