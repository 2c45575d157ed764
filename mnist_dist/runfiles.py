"""The run folder's files, read and written in one place (the tracker, the pictures, the trainer and
the checkpointer all go through here), so a file's name and format are stated once.

    config.json                  the validated TrainConfig the run trained with
    metrics.jsonl                one JSON record per log (``kind`` "step" or "epoch"), appended as it runs
    summary.json                 the final results
    val_predictions.safetensors  what ``mnist-dist report`` needs to draw the pictures again
    model.safetensors            the final weights (``mnist_dist.weights``)
    wandb_run_id                 the wandb run a resumed training continues

Everything but metrics.jsonl is written whole through ``mnist_dist.files``, so a reader never sees half
a file. metrics.jsonl is appended line by line: a killed run can leave a torn last line, which the
readers drop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from mnist_dist.config import TrainConfig
from mnist_dist.files import atomic_write, write_json_atomic, write_text_atomic

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PREDICTIONS_FILE = "val_predictions.safetensors"
WEIGHTS_FILE = "model.safetensors"
WANDB_ID_FILE = "wandb_run_id"
MAX_MISCLASSIFIED = 48  # misclassified validation digits kept for the picture (a 6 x 8 grid)


class RunFilesError(ValueError):
    """The folder is not a run folder, or one of its files is unreadable; the message says which."""


# ------------------------------------------------------------------ config.json
def write_config(folder: Path, cfg: TrainConfig) -> Path:
    """The run folder's record of its config; also how the launcher hands the config to its ranks."""
    return write_text_atomic(Path(folder) / CONFIG_FILE, cfg.to_json() + "\n")


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's config.json as a dict; None when the folder has none."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunFilesError(f"{path} is unreadable: {e}") from None
    if not isinstance(config, dict):
        raise RunFilesError(f"{path} holds a {type(config).__name__}, expected a JSON object")
    return config


# ------------------------------------------------------------------ metrics.jsonl
class MetricsLog:
    """Appends one JSON record per line, each line flushed as written, so a reader (or a crash)
    loses at most the line being written."""

    def __init__(self, run_dir: Path) -> None:
        self._file = open(Path(run_dir) / METRICS_FILE, "a", buffering=1)  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a torn last line (a killed run) is dropped, any other bad line raises."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RunFilesError(f"{run_dir} is not a run folder: it has no {METRICS_FILE}")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if number < len(lines):
                raise RunFilesError(f"{path} line {number} is not JSON: {e}") from None
    return records


def trim_metrics(run_dir: Path, global_step: int, epoch: int) -> None:
    """Drop records past a resumed position (``global_step`` steps, ``epoch`` epochs done): steps a
    killed run logged after its last checkpoint are trained again, and would otherwise appear twice.
    Lines that are not JSON (a torn last line) go too."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "step" and record["step"] > global_step:
            continue
        if record.get("kind") == "epoch" and record["epoch"] > epoch:
            continue
        kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


# ------------------------------------------------------------------ summary.json, wandb_run_id
def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    return write_json_atomic(Path(run_dir) / SUMMARY_FILE, summary)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json; None while the run has not finished."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunFilesError(f"{path} is unreadable: {e}") from None
    if not isinstance(summary, dict):
        raise RunFilesError(f"{path} holds a {type(summary).__name__}, expected a JSON object")
    return summary


def write_wandb_id(run_dir: Path, run_id: str) -> Path:
    return write_text_atomic(Path(run_dir) / WANDB_ID_FILE, run_id + "\n")


def read_wandb_id(run_dir: Path) -> str | None:
    path = Path(run_dir) / WANDB_ID_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None


# ------------------------------------------------------------------ validation predictions
def save_val_predictions(
    run_dir: Path, labels: torch.Tensor, predictions: torch.Tensor, images: torch.Tensor
) -> Path:
    """Keep what the pictures need (tens of KB): every label and prediction, and only the first
    misclassified images, so a report can be drawn later without the dataset."""
    from safetensors.torch import save_file

    labels, predictions = labels.cpu(), predictions.cpu()
    shown = (predictions != labels).nonzero().flatten()[:MAX_MISCLASSIFIED]
    tensors = {
        "labels": labels.to(torch.uint8),
        "predictions": predictions.to(torch.uint8),
        "wrong_index": shown,
        "wrong_images": images[shown.to(images.device)].reshape(-1, 28, 28).cpu().contiguous(),
    }
    return atomic_write(Path(run_dir) / PREDICTIONS_FILE, lambda tmp: save_file(tensors, str(tmp)))


def load_val_predictions(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(run_dir) / PREDICTIONS_FILE
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise RunFilesError(f"{path} is unreadable: {e}") from None
