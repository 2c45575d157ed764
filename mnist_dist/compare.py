"""Runs side by side, from their folders alone (offline, no dataset): one row per run, and the runs'
curves overlaid in one picture. A run without summary.json (stopped or still training) is shown as
far as its last logged epoch and marked unfinished."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mnist_dist import runfiles
from mnist_dist.model import build_model, count_parameters
from mnist_dist.plots import latest, plot_compare
from mnist_dist.spec import MODELS, TTA_LABEL

COLUMNS = (  # (row key, header)
    ("run", "run"),
    ("preset", "preset"),
    ("model", "model"),
    ("params", "params"),
    ("epochs", "epochs"),
    ("world_size", "world"),
    ("val_acc", "val"),
    ("test_acc", "test"),
    ("best_epoch", "best"),
    ("wall_seconds", "wall"),
    ("train_seconds", "train"),
    ("images_per_second", "img/s"),
    ("status", "status"),
)
TTA_COLUMNS = (("val_tta_acc", "val, TTA"), ("test_tta_acc", "test, TTA"))  # shown when a run measured them
_ACCURACIES = ("val_acc", "test_acc", *(key for key, _ in TTA_COLUMNS))
_TEXT = ("run", "preset", "model", "status")  # left-aligned columns


def run_row(run_dir: Path, epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's row: its summary's numbers when it finished, else what its last epoch record says."""
    config = runfiles.read_config(run_dir) or {}
    summary = runfiles.read_summary(run_dir)
    model = config.get("model")
    best = max(epochs, key=lambda r: r["val_acc"], default=None)
    row: dict[str, Any] = {
        "run": str(run_dir),
        "preset": config.get("preset"),
        "model": model,
        "epochs_planned": config.get("epochs"),
        "epochs_done": epochs[-1]["epoch"] if epochs else 0,
        "status": "finished" if summary else "unfinished",
    }
    if summary is not None:
        keys = ("params", "world_size", *_ACCURACIES, "best_epoch", "wall_seconds", "train_seconds")
        return {
            **row,
            **{k: summary.get(k) for k in keys},
            "images_per_second": summary.get("train_images_per_second"),
        }
    seconds = sum(r["epoch_seconds"] for r in epochs)
    images = sum(r["images_per_second"] * r["epoch_seconds"] for r in epochs)
    return {
        **row,
        "params": count_parameters(build_model(model)) if model in MODELS else None,
        "world_size": None,  # recorded in the summary only
        "val_acc": epochs[-1]["val_acc"] if epochs else None,
        "test_acc": None,  # measured once, at the end
        **{key: None for key, _ in TTA_COLUMNS},
        "best_epoch": best["epoch"] if best else None,
        "wall_seconds": None,
        "train_seconds": seconds if epochs else None,
        "images_per_second": images / seconds if seconds else None,
    }


def compare(run_dirs: list[Path], out: Path) -> list[dict[str, Any]]:
    """Every run's row, and the overlaid curves written to ``out``. Every folder is read before the
    picture is drawn, so a folder that is not a run leaves no picture behind."""
    runs = []
    for run_dir in run_dirs:
        if not Path(run_dir).is_dir():
            raise runfiles.RunFilesError(
                f"{run_dir} is not a run folder: it does not exist or is not a folder"
            )
        epochs = latest(runfiles.read_metrics(run_dir), "epoch")
        runs.append((Path(run_dir), epochs, run_row(Path(run_dir), epochs)))
    labels = _labels([r[0] for r in runs])
    curves = {
        label + ("" if row["status"] == "finished" else " (unfinished)"): epochs
        for label, (_, epochs, row) in zip(labels, runs, strict=True)
        if epochs
    }
    plot_compare(curves, out)
    return [row for _, _, row in runs]


def _labels(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or its path where two runs share a name."""
    names = [p.name for p in run_dirs]
    return [p.name if names.count(p.name) == 1 else str(p) for p in run_dirs]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as aligned columns: names left, numbers right; the TTA columns (labelled, with their
    views below) only where a run measured TTA (``--tta``)."""
    columns = COLUMNS
    tta = any(row[key] is not None for row in rows for key, _ in TTA_COLUMNS)
    if tta:
        at = columns.index(("test_acc", "test")) + 1
        columns = (*columns[:at], *TTA_COLUMNS, *columns[at:])
    lines = [[header for _, header in columns]] + [[_cell(row, key) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    table = [
        "  ".join(
            cell.ljust(width) if key in _TEXT else cell.rjust(width)
            for cell, width, (key, _) in zip(line, widths, columns, strict=True)
        ).rstrip()
        for line in lines
    ]
    if tta:
        table.append(f"{TTA_LABEL}: the same weights under test-time augmentation")
    return "\n".join(table)


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "epochs":
        done, planned = row["epochs_done"], row["epochs_planned"]
        return str(done) if row["status"] == "finished" or planned is None else f"{done}/{planned}"
    value = row[key]
    if value is None:
        return "-"
    if key in _ACCURACIES:
        return f"{100 * value:.2f}%"
    if key in ("wall_seconds", "train_seconds"):
        return _duration(value)
    if key in ("params", "images_per_second"):
        return f"{value:,.0f}"
    return str(value)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
