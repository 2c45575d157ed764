"""Real training runs on the real data: the run folder, accuracy a short run must reach,
reproducibility, the OneCycle schedule and the saved weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from mnist_dist import train as T
from mnist_dist.config import from_preset
from mnist_dist.model import Net

from .conftest import cli

SHORT = ("--preset", "reference", "--max-train-samples", "8000", "--epochs", "2", "--log-every", "10")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    out = tmp_path_factory.mktemp("train")
    trace = out / "trace"
    result = cli(
        "train", *SHORT, "--output-dir", str(out), "--name", "short", env={"MNIST_DIST_TRACE_DIR": str(trace)}
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out / "short"


def test_short_real_run_learns(short_run: Path) -> None:
    summary = json.loads((short_run / "summary.json").read_text())
    # 126 steps of the reference recipe on 8,000 images: a broken pipeline cannot get here.
    assert summary["val_acc"] >= 0.90, summary
    assert summary["test_acc"] >= 0.90, summary
    assert summary["val_count"] == summary["test_count"] == 10_000
    assert summary["params"] == 8440 and summary["world_size"] == 1 and summary["epochs"] == 2
    for key in ("best_epoch", "precision", "device", "wall_seconds", "train_images_per_second"):
        assert key in summary


def test_run_folder_holds_config_metrics_and_weights(short_run: Path) -> None:
    config = json.loads((short_run / "config.json").read_text())
    assert config["preset"] == "reference" and config["max_train_samples"] == 8000
    records = [json.loads(line) for line in (short_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[-1]["val_acc"] == json.loads((short_run / "summary.json").read_text())["val_acc"]
    state = load_file(str(short_run / "model.safetensors"))
    Net().load_state_dict(state, strict=True)


def test_evaluate_reproduces_the_run_summary(short_run: Path) -> None:
    summary = json.loads((short_run / "summary.json").read_text())
    result = cli("evaluate", str(short_run / "model.safetensors"))
    assert result.returncode == 0, result.stderr
    assert f"val  {100 * summary['val_acc']:.2f}%" in result.stdout
    assert f"test {100 * summary['test_acc']:.2f}%" in result.stdout


def test_evaluate_accepts_a_reference_state_dict_and_refuses_pickled_code(
    short_run: Path, tmp_path: Path
) -> None:
    state = load_file(str(short_run / "model.safetensors"))
    torch.save(state, tmp_path / "reference.pt")
    result = cli("evaluate", str(tmp_path / "reference.pt"))
    assert result.returncode == 0 and "val  " in result.stdout, result.stderr

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("code ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    result = cli("evaluate", str(tmp_path / "evil.pt"))
    assert result.returncode == 2
    assert "weights_only=True refused it" in result.stderr and "code ran" not in result.stdout


def test_one_cycle_schedule_spans_exactly_the_steps_taken(short_run: Path) -> None:
    trace = json.loads((short_run.parent / "trace" / "rank0.json").read_text())
    lrs, steps = trace["lr"], json.loads((short_run / "summary.json").read_text())["steps"]
    assert len(lrs) == steps == 2 * 63
    assert lrs[0] == pytest.approx(5e-3 / 25)
    assert max(lrs) == pytest.approx(5e-3, rel=1e-3)
    assert abs(lrs.index(max(lrs)) - 0.2 * steps) <= 1
    assert lrs[-1] == pytest.approx(5e-3 / 25 / 1e4)


def test_same_seed_gives_the_same_weights(tmp_path: Path) -> None:
    args = (
        "train",
        "--preset",
        "reference",
        "--max-train-samples",
        "1000",
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path),
    )
    for name in ("a", "b"):
        result = cli(*args, "--name", name, "--deterministic", "--threads", "1")
        assert result.returncode == 0, result.stderr[-2000:]
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stepping_torchs_optimizer_changes_no_weight(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop bypasses Accelerate's optimizer wrapper (it costs ~1 ms a step) when no loss scaler is
    in use; stepping through the wrapper instead gives the very same weights."""
    wrapper_steps: list[int] = []
    wrapper_step = AcceleratedOptimizer.step

    def counted(self: AcceleratedOptimizer, *args: Any, **kwargs: Any) -> Any:
        wrapper_steps.append(1)
        return wrapper_step(self, *args, **kwargs)

    monkeypatch.setattr(AcceleratedOptimizer, "step", counted)

    def run(name: str) -> dict[str, torch.Tensor]:
        AcceleratorState._reset_state(reset_partial_state=True)
        cfg = from_preset(
            "reference", epochs=1, max_train_samples=1024, data_dir=str(data_root),
            output_dir=str(tmp_path), name=name, wandb="disabled", threads=1, deterministic=True,
        )  # fmt: skip
        T.train(cfg)
        return load_file(str(tmp_path / name / "model.safetensors"))

    direct = run("direct")
    assert wrapper_steps == []
    monkeypatch.setattr(T, "optimizer_stepper", lambda optimizer, accelerator: optimizer)
    wrapped = run("wrapped")
    assert len(wrapper_steps) == 8  # 1,024 samples / batch 128
    assert direct.keys() == wrapped.keys()
    assert all(torch.equal(direct[k], wrapped[k]) for k in direct)
