"""The run's pictures, drawn from the run folder's files alone (matplotlib, Agg renderer, no display):

    curves.png            training curves: loss, accuracy, learning rate
    confusion_matrix.png  validation confusion matrix
    misclassified.png     misclassified validation digits, true → predicted

    mnist-dist report RUN_DIR          # draws them again, e.g. after changing this file
    mnist-dist compare RUN_DIR...      # several runs' curves overlaid in one picture (plot_compare)

The training writes them at its end through the same ``render_run``; the figures use matplotlib's
object API (no pyplot), so drawing never touches global state or needs a display.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from mnist_dist.files import atomic_write
from mnist_dist.runfiles import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    RunFilesError,
    load_val_predictions,
    read_metrics,
)

CLASSES = 10


def render_run(run_dir: Path) -> tuple[list[Path], list[str]]:
    """Draw every picture the run's files allow; return (PNGs written, why any was skipped).
    Every file is read before the first picture is drawn, so a bad file leaves no picture behind."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise RunFilesError(f"{run_dir / METRICS_FILE} has no records yet")
    pred = load_val_predictions(run_dir) if (run_dir / PREDICTIONS_FILE).is_file() else None
    written = [plot_curves(records, run_dir / "curves.png")]
    if pred is None:
        reason = (
            f"confusion matrix and misclassified digits: {PREDICTIONS_FILE} is written when a run finishes"
        )
        return written, [reason]
    labels, predictions = pred["labels"].long(), pred["predictions"].long()
    written.append(plot_confusion(confusion_matrix(labels, predictions), run_dir / "confusion_matrix.png"))
    written.append(
        plot_misclassified(
            pred["wrong_images"],
            labels[pred["wrong_index"]],
            predictions[pred["wrong_index"]],
            int((labels != predictions).sum()),
            run_dir / "misclassified.png",
        )
    )
    return written, []


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """counts[true, predicted]."""
    flat = labels.long() * CLASSES + predictions.long()
    return torch.bincount(flat, minlength=CLASSES * CLASSES).reshape(CLASSES, CLASSES)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def plot_curves(records: list[dict[str, Any]], path: Path) -> Path:
    """Loss, accuracy and LR against (fractional) epochs."""
    steps, epochs = latest(records, "step"), latest(records, "epoch")
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    loss, acc, lr = fig.subplots(1, 3)

    if steps:
        loss.plot(
            [r["epoch"] for r in steps],
            [r["train/loss"] for r in steps],
            lw=0.8,
            alpha=0.5,
            label=f"train (mean of {_step_gap(steps)} steps)",
        )
    e = [r["epoch"] for r in epochs]
    loss.plot(e, [r["train_loss"] for r in epochs], "o-", label="train (epoch mean)")
    loss.plot(e, [r["val_loss"] for r in epochs], "s-", label="validation")
    loss.set(title="Loss (NLL)", xlabel="epoch", yscale="log")
    loss.yaxis.set_major_formatter(FuncFormatter(_plain))
    loss.yaxis.set_minor_formatter(FuncFormatter(_one_two_five))

    acc.plot(e, [100 * r["train_acc"] for r in epochs], "o-", label="train (augmented)")
    acc.plot(e, [100 * r["val_acc"] for r in epochs], "s-", label="validation")
    best = max(epochs, key=lambda r: r["val_acc"], default=None)
    best_text = f": best val {100 * best['val_acc']:.2f}% (epoch {best['epoch']})" if best else ""
    acc.set(title="Accuracy (%)" + best_text, xlabel="epoch")

    # Epoch records hold the LR at each epoch's end, so a run logged without step records still has a curve.
    points = sorted([(r["epoch"], r["lr"]) for r in [*steps, *epochs]])
    lr.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
    lr.set(title="Learning rate", xlabel="epoch")
    for ax in (loss, acc):
        ax.legend(fontsize=8)
    for ax in (loss, acc, lr):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def latest(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The records of one ``kind`` ("step" or "epoch", each numbered by the field of that name) in
    order. A resumed run appends records: the last one of each number wins."""
    return sorted({r[kind]: r for r in records if r.get("kind") == kind}.values(), key=lambda r: r[kind])


def plot_compare(curves: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Several runs' validation accuracy and train loss by epoch, overlaid; ``curves`` maps each run's
    label to its epoch records."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    acc, loss = fig.subplots(1, 2)
    for label, epochs in curves.items():
        e = [r["epoch"] for r in epochs]
        acc.plot(e, [100 * r["val_acc"] for r in epochs], "o-", ms=3, label=label)
        loss.plot(e, [r["train_loss"] for r in epochs], "o-", ms=3, label=label)
    acc.set(title="Validation accuracy (%)", xlabel="epoch")
    loss.set(title="Train loss (epoch mean, NLL)", xlabel="epoch", yscale="log")
    loss.yaxis.set_major_formatter(FuncFormatter(_plain))
    loss.yaxis.set_minor_formatter(FuncFormatter(_one_two_five))
    for ax in (acc, loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _plain(value: float, _: int) -> str:
    return f"{value:g}"


def _one_two_five(value: float, _: int) -> str:
    """Label only the 2s and 5s between the decades of a log axis: 0.02 0.05 0.1 0.2 0.5 1 2."""
    return f"{value:g}" if round(value / 10 ** math.floor(math.log10(value))) in (2, 5) else ""


def _step_gap(steps: list[dict[str, Any]]) -> int:
    return steps[1]["step"] - steps[0]["step"] if len(steps) > 1 else steps[0]["step"]


def plot_confusion(counts: torch.Tensor, path: Path) -> Path:
    """Counts in the cells; colour is the fraction of each true class, so rare errors stay visible."""
    total, correct = int(counts.sum()), int(counts.diag().sum())
    share = counts.double() / counts.sum(1, keepdim=True).clamp(min=1)
    fig = Figure(figsize=(6.4, 5.6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share.sqrt().numpy(), cmap="Blues", vmin=0, vmax=1)
    for t in range(CLASSES):
        for p in range(CLASSES):
            if n := int(counts[t, p]):
                ax.text(
                    p,
                    t,
                    str(n),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[t, p] > 0.5 else "black",
                )
    ax.set(
        xticks=range(CLASSES),
        yticks=range(CLASSES),
        xlabel="predicted",
        ylabel="true",
        title=f"Validation confusion matrix: {100 * correct / max(total, 1):.2f}% of {total:,}",
    )
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_ticks([0, 0.1**0.5, 0.5**0.5, 1], labels=["0", "10%", "50%", "100%"])
    bar.set_label("share of the true class (sqrt scale)")
    return _save(fig, path)


def plot_misclassified(
    images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, total_wrong: int, path: Path
) -> Path:
    """Up to 6 x 8 digits, each titled true → predicted."""
    cols = 8
    rows = max(1, -(-len(images) // cols))
    height = rows * 1.25 + 0.5  # inches: 1.25 a row (digit and its title), 0.5 for the figure's title
    # Fixed margins: a constrained layout of 48 axes takes longer than the rest of the picture.
    fig = Figure(figsize=(cols * 1.1, height))
    grid = {"left": 0.01, "right": 0.99, "bottom": 0.05 / height, "top": 1 - 0.55 / height, "hspace": 0.35}
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=grid).flatten()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < len(images):
            ax.imshow(images[i].numpy(), cmap="gray_r", vmin=0, vmax=255)
            ax.set_title(f"{int(labels[i])} → {int(predictions[i])}", fontsize=9, color="firebrick")
    fig.suptitle(
        f"Misclassified validation digits (true → predicted): {len(images)} of {total_wrong:,}"
        if total_wrong
        else "No misclassified validation digits"
    )
    return _save(fig, path)
