"""The training loop in-process, on synthetic digits: step counts and the OneCycle schedule (with
gradient accumulation and LR scaling), the logged loss windows, the EMA, reproducibility, and a run
stopped by a signal and resumed, which ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from safetensors.torch import load_file

from mnist_dist import runfiles
from mnist_dist import trainer as T
from mnist_dist.config import from_preset
from mnist_dist.data import MNISTArrays
from mnist_dist.model import build_model
from mnist_dist.optim import EMA
from mnist_dist.preemption import PREEMPTED_EXIT, Preempted


class Trace(T.Hooks):
    """Each step's micro-batch indices and learning rate (the LR the optimizer holds for that step)."""

    def __init__(self) -> None:
        self.indices: list[list[list[int]]] = []
        self.lr: list[float] = []

    def on_step(self, trainer: T.Trainer, micro_batches: list[torch.Tensor]) -> None:
        self.indices.append([mb.tolist() for mb in micro_batches])
        self.lr.append(trainer.optimizer.param_groups[0]["lr"])


class SignalAt(T.Hooks):
    """Sends this process a signal just before the given step, as a scheduler or Ctrl-C would."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_step(self, trainer: T.Trainer, micro_batches: list[torch.Tensor]) -> None:
        if trainer.state.global_step + 1 == self.step:
            signal.raise_signal(self.signum)


def config(tmp: Path, name: str, **changes: Any) -> Any:
    preset = changes.pop("preset", "reference")
    options = {
        "epochs": 2, "max_train_samples": 1024, "output_dir": str(tmp), "name": name,
        "wandb": "disabled", "threads": 1, "deterministic": True, **changes,
    }  # fmt: skip
    return from_preset(preset, **options)


def run(tmp: Path, name: str, data: MNISTArrays, *hooks: T.Hooks, **changes: Any) -> dict[str, Any]:
    return T.train(config(tmp, name, **changes), data=data, hooks=hooks)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / runfiles.WEIGHTS_FILE))


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in runfiles.read_metrics(run_dir) if r["kind"] == kind]


@pytest.mark.parametrize(
    ("batch", "accum", "scale_lr", "steps_per_epoch"),
    [(128, 1, False, 8), (64, 2, False, 8), (100, 3, True, 4)],
    ids=["plain", "grad-accum-2", "grad-accum-3-scale-lr"],
)
def test_schedule_spans_the_optimizer_steps_taken(
    tmp_path: Path, digits: MNISTArrays, batch: int, accum: int, scale_lr: bool, steps_per_epoch: int
) -> None:
    """Whatever --grad-accum and --scale-lr: one LR per optimizer step, from max_lr/25 up to max_lr
    after pct_start of the steps and down to its final value on the last step."""
    trace = Trace()
    summary = run(
        tmp_path, "r", digits, trace, batch_size=batch, grad_accum=accum, scale_lr=scale_lr, epochs=2
    )
    steps = 2 * steps_per_epoch
    assert summary["steps"] == len(trace.lr) == steps
    peak = 5e-3 * (batch * accum / 128 if scale_lr else 1.0)
    assert trace.lr[0] == pytest.approx(peak / 25)
    assert max(trace.lr) == pytest.approx(peak, rel=0.05)
    assert abs(trace.lr.index(max(trace.lr)) - 0.2 * steps) <= 1
    assert trace.lr[-1] == pytest.approx(peak / 25 / 1e4)
    for epoch in range(2):  # each optimizer step holds `accum` micro-batches; every sample once
        plan = trace.indices[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
        assert all(len(step) == accum for step in plan[:-1])
        assert sorted(i for step in plan for mb in step for i in mb) == list(range(1024))


def test_logged_train_loss_is_the_mean_over_its_own_window(tmp_path: Path, digits: MNISTArrays) -> None:
    """With a learning rate too small to move the weights, every step's mean loss is about the same,
    so every logged window must be too, including the first of an epoch (steps 6-10 here straddle
    the epoch boundary after step 8)."""
    run(tmp_path, "w", digits, log_every=5, lr=1e-12, max_lr=1e-12)
    logged = {r["step"]: r["train/loss"] for r in records(tmp_path / "w", "step")}
    assert list(logged) == [5, 10, 15]
    epoch_loss = records(tmp_path / "w", "epoch")[0]["train_loss"]
    for step, loss in logged.items():
        assert loss == pytest.approx(epoch_loss, rel=0.1), (step, logged, epoch_loss)


def test_the_ema_is_what_is_evaluated_and_saved(tmp_path: Path, digits: MNISTArrays) -> None:
    class Keep(T.Hooks):
        def on_finish(self, trainer: T.Trainer, summary: dict[str, Any]) -> None:
            self.ema = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}
            self.live = {k: v.clone() for k, v in trainer.net.state_dict().items()}

    keep = Keep()
    run(tmp_path, "e", digits, keep, ema=0.9)
    saved = weights(tmp_path / "e")
    assert all(torch.equal(saved[k], keep.ema[k]) for k in saved)
    assert not all(torch.equal(saved[k], keep.live[k]) for k in saved if saved[k].is_floating_point())


def test_ema_update_follows_its_warm_up() -> None:
    net = build_model("net")
    ema = EMA(net, decay=0.999)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(step=1)  # decay min(0.999, 2/11): the average moves 9/11 of the way
    for name, _ in net.named_parameters():
        assert torch.allclose(ema.module.state_dict()[name], start[name] + 9 / 11, atol=1e-6)


def test_a_short_run_learns_and_writes_its_run_folder(tmp_path: Path, digits: MNISTArrays) -> None:
    summary = run(tmp_path, "s", digits, preset="default", max_train_samples=4096, threads=2)
    assert summary["val_acc"] > 0.95 and summary["test_acc"] > 0.95, summary  # chance: 0.1
    assert (summary["val_count"], summary["test_count"]) == (1_000, 1_000)  # the synthetic digits' splits
    folder = tmp_path / "s"
    assert json.loads((folder / runfiles.CONFIG_FILE).read_text())["model"] == "net_wider"
    assert json.loads((folder / runfiles.SUMMARY_FILE).read_text())["val_acc"] == summary["val_acc"]
    assert set(weights(folder)) == set(build_model("net_wider").state_dict())
    assert math.isfinite(summary["train_images_per_second"])


def test_same_seed_same_weights_and_another_seed_differs(tmp_path: Path, digits: MNISTArrays) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run(tmp_path, name, digits, seed=seed, epochs=1, max_train_samples=512)
    a, b, c = (weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_stepping_torchs_optimizer_changes_no_weight(
    tmp_path: Path, digits: MNISTArrays, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop steps torch's optimizer, not Accelerate's wrapper, when no loss scaler is in use;
    stepping through the wrapper gives the very same weights."""
    calls: list[int] = []
    wrapped_step = AcceleratedOptimizer.step

    def counted(self: AcceleratedOptimizer, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return wrapped_step(self, *args, **kwargs)

    monkeypatch.setattr(AcceleratedOptimizer, "step", counted)
    run(tmp_path, "direct", digits, epochs=1)
    assert calls == []
    monkeypatch.setattr(T, "optimizer_stepper", lambda optimizer, accelerator: optimizer)
    run(tmp_path, "wrapped", digits, epochs=1)
    assert len(calls) == 8  # 1,024 samples / batch 128
    direct, wrapped = weights(tmp_path / "direct"), weights(tmp_path / "wrapped")
    assert all(torch.equal(direct[k], wrapped[k]) for k in direct)


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, PREEMPTED_EXIT), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"]
)
def test_a_stopped_run_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, digits: MNISTArrays, signum: int, code: int
) -> None:
    """Stopped mid-epoch 2 by a signal (a checkpoint at that step), then `--resume auto`: the final
    weights and every logged record equal those of a run that was never stopped."""
    options = {"log_every": 3, "checkpoint_every": 5, "ema": 0.9}
    run(tmp_path, "ref", digits, **options)
    with pytest.raises(Preempted) as stopped:
        run(tmp_path, "cut", digits, SignalAt(11, signum), **options)
    assert stopped.value.exit_code == code
    assert not (tmp_path / "cut" / runfiles.SUMMARY_FILE).exists()
    run(tmp_path, "cut", digits, resume="auto", **options)
    ref, cut = weights(tmp_path / "ref"), weights(tmp_path / "cut")
    assert all(torch.equal(ref[k], cut[k]) for k in ref), "final weights differ"
    for kind, keys in (("step", ("step", "train/loss", "lr")), ("epoch", ("epoch", "train_loss", "val_acc"))):
        assert [[r[k] for k in keys] for r in records(tmp_path / "cut", kind)] == [
            [r[k] for k in keys] for r in records(tmp_path / "ref", kind)
        ]
