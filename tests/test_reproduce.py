"""A run reproduced from its config.json writes the same model.safetensors, byte for byte, on the CPU
with the same threads: in-process on synthetic digits, and (the proofs) on real MNIST through the real
command, `python -m mnist_dist.train` under torchrun, and with an option on top that changes it. Also
what a reproduction and its user get from the command itself: `--version` and shell completion."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import accelerate
import pytest
import torch
from typer.testing import CliRunner

import mnist_dist
from mnist_dist import runfiles
from mnist_dist import trainer as T
from mnist_dist.cli import app
from mnist_dist.config import from_preset, read_config_file
from mnist_dist.data import MNISTArrays

from .helpers import cli, free_port, started


def weights(run_dir: Path) -> bytes:
    return (run_dir / runfiles.WEIGHTS_FILE).read_bytes()


def test_a_run_reproduced_from_its_config_writes_the_same_weights(
    tmp_path: Path, digits: MNISTArrays
) -> None:
    cfg = from_preset(
        "reference", epochs=1, max_train_samples=512, output_dir=str(tmp_path), name="first",
        wandb="disabled", threads=1,
    )  # fmt: skip
    T.train(cfg, data=digits)
    again = read_config_file(tmp_path / "first" / runfiles.CONFIG_FILE)
    assert again == cfg  # every field comes back, typed as it was
    T.train(again.replace(name="again"), data=digits)
    assert weights(tmp_path / "again") == weights(tmp_path / "first")


def test_options_given_with_config_override_only_their_fields(tmp_path: Path) -> None:
    cfg = from_preset("reference", epochs=3, threads=1, output_dir=str(tmp_path), name="a")
    path = runfiles.write_config(tmp_path, cfg)
    result = CliRunner().invoke(
        app, ["train", "--config", str(path), "--name", "b", "--seed", "2", "--print-config"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == cfg.replace(name="b", seed=2).to_dict()


# ---------------------------------------------------------------------- versions and shell completion
def test_version_names_every_version_a_reproduction_needs_without_a_command() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert [line.split(None, 1) for line in result.stdout.splitlines()] == [
        ["mnist-dist", mnist_dist.__version__],
        ["torch", torch.__version__],
        ["accelerate", accelerate.__version__],
        ["CUDA", f"{torch.version.cuda} ({torch.cuda.device_count()} GPU(s) visible)" if torch.version.cuda
                 else "none (a CPU build of torch)"],
    ]  # fmt: skip
    assert "Usage: mnist-dist" in CliRunner().invoke(app, [], prog_name="mnist-dist").output  # still help


def test_the_shell_completes_commands_and_their_options() -> None:
    def complete(words: str) -> list[str]:
        shell = {
            "_MNIST_DIST_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(words.count(" ")),
        }
        return CliRunner().invoke(app, [], prog_name="mnist-dist", env=shell).stdout.split()

    assert complete("mnist-dist ev") == ["evaluate"]
    assert {"--out", "--json"} <= set(complete("mnist-dist compare --"))
    assert "--install-completion" in CliRunner().invoke(app, ["--help"]).output


# ---------------------------------------------------------------------- proofs: real MNIST, real processes
SHORT = ("--max-train-samples", "1024", "--epochs", "1", "--threads", "1")


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """`mnist-dist train --preset reference` on 1,024 real images; the folder the runs below work in."""
    work = tmp_path_factory.mktemp("reproduce")
    done = cli(
        "train",
        "--preset",
        "reference",
        *SHORT,
        "--name",
        "a",
        cwd=work,
        env={"MNIST_DATA_DIR": str(data_root)},
    )
    assert done.returncode == 0, done.stderr
    return work


@pytest.mark.proof
def test_the_command_reproduces_a_run_from_its_config(first: Path, data_root: Path) -> None:
    """(That an option given beside --config changes only its field is the fast tier's
    `test_options_given_with_config_override_only_their_fields`.)"""
    done = cli(
        "train",
        "--config",
        "runs/a/config.json",
        "--name",
        "b",
        cwd=first,
        env={"MNIST_DATA_DIR": str(data_root)},
    )
    assert done.returncode == 0, done.stderr
    runs = first / "runs"
    assert weights(runs / "b") == weights(runs / "a")
    assert runfiles.read_config(runs / "b") == {**runfiles.read_config(runs / "a"), "name": "b"}


@pytest.mark.proof
def test_torchrun_takes_the_config_file_too(first: Path, data_root: Path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "mnist_dist.train", "--config", "runs/a/config.json",
        "--name", "t",
    ]  # fmt: skip
    log = first / "torchrun.log"
    with started(cmd, first, log, MNIST_DATA_DIR=str(data_root)) as proc:
        assert proc.wait(timeout=600) == 0, log.read_text()
    assert weights(first / "runs" / "t") == weights(first / "runs" / "a")
