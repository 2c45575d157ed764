"""Real multi-process runs on the CPU (gloo): the world size is really N, every training sample is
seen once per epoch across ranks, evaluation counts exactly 10,000, the schedule spans the true
steps, only rank 0 writes, and every way of launching gives the same training.

The N-rank runs start ``tests.traced_train`` under torchrun: each rank records its sampled indices
and learning rates through the trainer's hooks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mnist_dist import env
from mnist_dist.cli import app
from mnist_dist.config import from_preset

from .helpers import REPO, clean_env, free_port

pytestmark = pytest.mark.proof
N = 600  # training samples in the slice
COMMON = ("--preset", "reference", "--max-train-samples", str(N), "--epochs", "2", "--wandb", "disabled")
RUN_FILES = {
    "config.json", "metrics.jsonl", "summary.json", "model.safetensors", "checkpoints",
    "val_predictions.safetensors", "curves.png", "confusion_matrix.png", "misclassified.png",
}  # fmt: skip


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    return tmp_path_factory.mktemp("dist")


def traced_run(runs: Path, name: str, world: int, **changes: object) -> tuple[dict, list[dict]]:
    cfg = from_preset(
        "reference",
        max_train_samples=N,
        epochs=2,
        wandb="disabled",
        output_dir=str(runs),
        name=name,
        **changes,
    )
    (runs / f"{name}.json").write_text(cfg.to_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_port", str(free_port()), "-m", "tests.traced_train", str(runs / f"{name}-trace"),
           str(runs / f"{name}.json")]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=REPO, env=clean_env(**{env.EXPECTED_WORLD: str(world)}), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    summary = json.loads((runs / name / "summary.json").read_text())
    traces = [json.loads(p.read_text()) for p in sorted((runs / f"{name}-trace").glob("rank*.json"))]
    return summary, traces


@pytest.mark.parametrize("world", [2, 3])
def test_n_ranks_shard_once_count_exactly_and_schedule_true_steps(runs: Path, world: int) -> None:
    name = f"w{world}"
    summary, traces = traced_run(runs, name, world, batch_size=64)
    assert summary["world_size"] == world
    assert sorted(t["rank"] for t in traces) == list(range(world)) and {t["world"] for t in traces} == {world}
    steps_per_epoch = summary["steps"] // 2
    for epoch in range(2):
        seen = [
            i
            for t in traces
            for batch in t["indices"][epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
            for i in batch
        ]
        assert sorted(seen) == list(range(N)), f"epoch {epoch}: duplicates or gaps across ranks"
    assert summary["val_count"] == summary["test_count"] == 10_000
    for t in traces:  # every rank steps the schedule once per optimizer step
        lrs = t["lr"]
        assert len(lrs) == summary["steps"]
        assert lrs[0] == pytest.approx(5e-3 / 25) and lrs[-1] == pytest.approx(5e-3 / 25 / 1e4)
        assert max(lrs) == pytest.approx(5e-3, rel=0.2)
    assert {p.name for p in (runs / name).iterdir()} == RUN_FILES  # rank 0 alone wrote the folder
    epochs = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]
    # The final weights' accuracy does not depend on how many ranks evaluated them.
    single = CliRunner().invoke(app, ["evaluate", str(runs / name)])
    assert f"val  {100 * summary['val_acc']:.2f}%" in single.output, single.output


def test_launchers_agree_bit_for_bit(runs: Path) -> None:
    """mnist-dist --processes 2, torchrun, accelerate launch with the repo's config, and two
    'nodes' over loopback: one training, the same weights."""
    # Same threads per rank everywhere: two 'nodes' on one machine would each take all the cores,
    # and a different thread count changes float summation order.
    base = ("--global-batch-size", "128", "--seed", "3", "--threads", "1")
    p2 = subprocess.run(
        [sys.executable, "-m", "mnist_dist.cli", "train", *COMMON, *base, "--processes", "2",
         "--output-dir", str(runs), "--name", "p2"],
        env=clean_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p2.returncode == 0, p2.stderr[-3000:]
    ref_summary = json.loads((runs / "p2" / "summary.json").read_text())
    assert ref_summary["steps"] == 2 * 5  # ceil(600 / 128) steps of the global batch, per epoch
    environment = clean_env(**{env.EXPECTED_WORLD: "2"})
    train_args = [*COMMON, *base, "--output-dir", str(runs)]
    port = free_port()
    commands = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                     "--master_port", str(free_port()), "-m", "mnist_dist.train", *train_args, "--name", "torchrun"],
        "accel": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_config.yaml"),
                  "--main_process_port", str(free_port()), "-m", "mnist_dist.train", *train_args, "--name", "accel"],
    }  # fmt: skip
    for name, cmd in commands.items():
        result = subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, name + result.stderr[-3000:]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mnist_dist.cli",
                "train",
                *train_args,
                "--name",
                "nodes",
                "--nodes",
                "2",
                "--node-rank",
                str(r),
                "--processes",
                "1",
                "--main-address",
                "127.0.0.1",
                "--main-port",
                str(port),
            ],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    ref = weights(runs / "p2")
    for name in ("torchrun", "accel", "nodes"):
        summary = json.loads((runs / name / "summary.json").read_text())
        assert summary["world_size"] == 2, name
        other = weights(runs / name)
        assert all(torch.equal(ref[k], other[k]) for k in ref), (
            f"{name} trained differently from --processes 2"
        )
        assert summary["val_acc"] == ref_summary["val_acc"]


def test_fewer_ranks_than_asked_fails_clearly(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "mnist_dist.train", *COMMON, "--output-dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(
        cmd, env=clean_env(**{env.EXPECTED_WORLD: "3"}), capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "asked for 3 processes but this run has world size 2" in result.stderr


def test_a_crashed_rank_fails_the_whole_launch_quickly(tmp_path: Path, data_root: Path) -> None:
    cmd = [sys.executable, "-m", "mnist_dist.cli", "train", "--preset", "reference", "--epochs", "50",
           "--processes", "2", "--output-dir", str(tmp_path), "--name", "crash"]  # fmt: skip
    parent = subprocess.Popen(
        cmd,
        env=clean_env(WANDB_MODE="disabled"),  # no wandb-core child among the ranks
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not (tmp_path / "crash" / "metrics.jsonl").exists():  # training has started
            assert parent.poll() is None and time.time() < deadline, parent.communicate()
            time.sleep(0.5)
        ranks = [
            p
            for p in psutil.Process(parent.pid).children(recursive=True)
            if "LOCAL_RANK" in p.environ() and "mnist_dist.train" in p.cmdline()  # not the launcher or agent
        ]
        assert len(ranks) == 2
        ranks[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, err = parent.communicate(timeout=120)
        assert parent.returncode != 0
        assert time.time() - killed_at < 60, "the launch hung after a rank died"
        assert "rank exited" in err or "failed" in err.lower()
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
        for p in psutil.process_iter(["cmdline"]):  # nothing left behind
            if str(tmp_path) in " ".join(p.info["cmdline"] or []):
                p.kill()
