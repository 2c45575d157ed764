"""The speed settings: which device trains, which settings a run on it uses by default, and the
compiled step (inductor, fused Adam with tensor LR and beta1) computing what the eager step does."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_dist import runfiles
from mnist_dist import trainer as T
from mnist_dist.config import CPU_SPEED, ConfigError, Speed, TrainConfig, from_preset
from mnist_dist.data import MNISTArrays
from mnist_dist.distributed import use_cpu
from mnist_dist.model import MODELS
from mnist_dist.preemption import Preempted

from .test_trainer import SignalAt, records, run, weights

# Per-step train loss of the compiled step against the eager one. The first steps differ by float
# rounding alone (fused kernels reassociate sums); after them, training amplifies that rounding the
# way it amplifies any perturbation, so over 50 steps the bound is looser.
FIRST_STEPS, FIRST_TOLERANCE = 3, 1e-5
LOSS_TOLERANCE = 2e-2


@pytest.mark.parametrize(
    ("forced", "cuda", "mps", "cpu"),
    [
        (False, True, False, False),  # a CUDA GPU trains
        (False, True, True, False),
        (False, False, True, False),  # an Apple-silicon laptop: MPS, as Accelerate would choose
        (False, False, False, True),  # nothing but the CPU
        (True, True, False, True),  # --cpu wins over any GPU
        (True, False, True, True),
    ],
)
def test_the_training_device_is_cuda_then_mps_then_the_cpu(
    forced: bool, cuda: bool, mps: bool, cpu: bool
) -> None:
    assert use_cpu(forced, cuda=cuda, mps=mps) is cpu


@pytest.mark.parametrize("model", MODELS)
def test_a_cpu_run_defaults_to_its_models_measured_settings(model: str) -> None:
    cfg = TrainConfig(model=model)
    assert cfg.speed("cpu") == CPU_SPEED.get(model, Speed())
    assert cfg.speed("cuda") == cfg.speed("mps") == Speed()  # not measured there: eager
    assert TrainConfig(model=model, compile=False, channels_last=False).speed("cpu") == Speed()
    assert TrainConfig(model=model, compile=True, channels_last=True).speed("cuda") == Speed(True, True)


def test_cuda_graphs_compile_the_model_on_cuda_and_are_refused_elsewhere() -> None:
    graphed = TrainConfig(cuda_graph=True)
    assert graphed.speed("cuda") == Speed(compile=True, channels_last=False, cuda_graph=True)
    assert graphed.validate(cuda=True) is graphed
    for cfg, cuda, says in (
        (graphed, False, "no CUDA GPU is visible"),
        (graphed.replace(cpu=True), True, "--cpu trains on the CPU"),
        (graphed.replace(compile=False), True, "cannot run with --no-compile"),
    ):
        with pytest.raises(ConfigError, match="--cuda-graph") as refused:
            cfg.validate(cuda=cuda)
        assert says in str(refused.value)


def step_losses(tmp: Path, data: MNISTArrays, name: str, compile: bool) -> tuple[list[float], dict]:
    cfg = from_preset(
        "default", epochs=1, max_train_samples=3180, batch_size=64, log_every=1, output_dir=str(tmp),
        name=name, wandb="disabled", threads=1, compile=compile, channels_last=True,
    )  # fmt: skip
    summary = T.train(cfg, data=data)
    losses = [r["train/loss"] for r in runfiles.read_metrics(tmp / name) if r["kind"] == "step"]
    return losses, summary


@pytest.mark.proof  # inductor's C++ builds: 25-50 s on a 2-core CPU, too slow for the fast tier
def test_the_compiled_step_gives_the_eager_steps_losses(tmp_path: Path, digits: MNISTArrays) -> None:
    """50 optimizer steps (the last a short batch, its own graph) of the default recipe (net_wider,
    dropout, EMA, elastic distortion) compiled
    by inductor, with the fused Adam of tensor hyperparameters, against the eager step with float
    ones: the first steps' losses within FIRST_TOLERANCE, all 50 within LOSS_TOLERANCE. Both run
    channels_last, whose memory order decides which element each dropout draw lands on."""
    eager, eager_summary = step_losses(tmp_path, digits, "eager", compile=False)
    compiled, summary = step_losses(tmp_path, digits, "compiled", compile=True)
    assert len(eager) == len(compiled) == 50
    assert (eager_summary["compile"], summary["compile"]) == (False, True)
    assert eager != compiled  # it really ran another path
    differences = [abs(a - b) for a, b in zip(eager, compiled, strict=True)]
    assert max(differences[:FIRST_STEPS]) < FIRST_TOLERANCE, differences[:FIRST_STEPS]
    assert max(differences) < LOSS_TOLERANCE, differences
    assert eager[-1] < eager[0] / 2  # and it learned: the comparison is not of two flat lines


@pytest.mark.proof  # inductor's C++ builds: 25-50 s on a 2-core CPU, too slow for the fast tier
def test_a_compiled_run_resumes_to_the_uninterrupted_weights(tmp_path: Path, digits: MNISTArrays) -> None:
    """Stopped by SIGTERM at step 11 (mid-epoch 2), then resumed: the compiled graphs, one per batch
    shape, are built again in another order, and the weights still equal the uninterrupted run's."""
    options = {"preset": "default", "compile": True, "channels_last": True, "checkpoint_every": 5}
    run(tmp_path, "ref", digits, **options)
    with pytest.raises(Preempted):
        run(tmp_path, "cut", digits, SignalAt(11, signal.SIGTERM), **options)
    summary = run(tmp_path, "cut", digits, resume="auto", **options)
    assert summary["compile"] is True
    ref, cut = weights(tmp_path / "ref"), weights(tmp_path / "cut")
    assert all(torch.equal(ref[k], cut[k]) for k in ref), "final weights differ"
    assert records(tmp_path / "cut", "step") == records(tmp_path / "ref", "step")


@pytest.mark.parametrize("precisions", ["bf16", "no,fp32", "no,"])
def test_speed_defaults_refuses_precisions_without_fp32_or_unknown_by_name(precisions: str) -> None:
    """`.ci/speed_defaults.py` divides every rate by the round's fp32 eager run: a list without fp32,
    or with a name --precision does not take, is refused before any run starts."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(repo / ".ci/speed_defaults.py"), "--precisions", precisions],
        capture_output=True, text=True, cwd=repo, env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"got {precisions!r}" in done.stderr and "include 'no'" in done.stderr
