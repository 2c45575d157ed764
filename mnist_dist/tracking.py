"""Rank-zero run records: the run folder's files (config.json, metrics.jsonl, summary.json).

This is the one place that decides who writes: ``make_tracker`` gives the main process a
``RunTracker`` and every other rank a ``NullTracker`` that does nothing, so the training loop
never asks which rank it is before logging.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from tqdm.auto import tqdm

from mnist_dist.config import TrainConfig


class NullTracker:
    """What non-main ranks get: every call is a no-op."""

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def print(self, message: str) -> None:
        pass

    def finish(self, summary: dict[str, Any], artifacts: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class RunTracker(NullTracker):
    """Writes the run folder on the main process."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        (run_dir / "config.json").write_text(cfg.to_json() + "\n")
        self._metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115

    def _write(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._write({"kind": "step", "step": step, **metrics})

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._write({"kind": "epoch", "epoch": epoch, **metrics})
        self.print(
            f"epoch {epoch:>2}/{self.cfg.epochs}  train loss {metrics['train_loss']:.4f} acc "
            f"{100 * metrics['train_acc']:.2f}%  val loss {metrics['val_loss']:.4f} acc "
            f"{100 * metrics['val_acc']:.2f}%  {metrics['images_per_second']:,.0f} img/s"
        )

    def print(self, message: str) -> None:
        tqdm.write(message)

    def finish(self, summary: dict[str, Any], artifacts: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / "summary.json", summary)

    def close(self) -> None:
        self._metrics.close()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def make_tracker(accelerator: Accelerator, cfg: TrainConfig, run_dir: Path) -> NullTracker:
    """The main process records the run; every other rank gets the do-nothing tracker."""
    if not accelerator.is_main_process:
        return NullTracker()
    return RunTracker(cfg, run_dir)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
