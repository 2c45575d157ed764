"""Runs side by side, from their folders alone (offline, no dataset): one row per run, and the runs'
curves overlaid in one picture. A run without summary.json (stopped or still training) is shown as
far as its last logged epoch and marked unfinished."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mnist_dist import runfiles
from mnist_dist.model import MODELS, build_model, count_parameters
from mnist_dist.plots import latest, plot_compare

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
        keys = ("params", "world_size", "val_acc", "test_acc", "best_epoch", "wall_seconds", "train_seconds")
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
    """The rows as aligned columns: names left, numbers right."""
    lines = [[header for _, header in COLUMNS]] + [[_cell(row, key) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if key in _TEXT else cell.rjust(width)
            for cell, width, (key, _) in zip(line, widths, COLUMNS, strict=True)
        ).rstrip()
        for line in lines
    )


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "epochs":
        done, planned = row["epochs_done"], row["epochs_planned"]
        return str(done) if row["status"] == "finished" or planned is None else f"{done}/{planned}"
    value = row[key]
    if value is None:
        return "-"
    if key in ("val_acc", "test_acc"):
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
