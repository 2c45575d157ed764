"""Measuring a model on a split: the training's exact-count evaluation over its ranks, and the
evaluation of saved weights in one process. Both run the same per-chunk arithmetic (``_sums``), so a
run's reported accuracy and ``mnist-dist evaluate`` of its weights count the same way.

Test-time augmentation (TTA) scores each image by the mean, over the fixed views
``spec.TTA_VIEWS``, of the model's probabilities."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from mnist_dist import data as D
from mnist_dist import spec
from mnist_dist.config import TrainConfig
from mnist_dist.distributed import local_device
from mnist_dist.weights import load_model


def _log_probs(
    model: torch.nn.Module,
    images_u8: torch.Tensor,
    views: Sequence[spec.View] | None,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> torch.Tensor:
    """The model's log-probabilities of a chunk; with ``views``, the log of the mean over the views of
    its probabilities (a log-mean-exp of the log-probabilities the models return, so one view is
    that view's output exactly)."""
    if views is None:
        x = D.normalize(images_u8)
        with autocast():
            return model(x).float()
    outs = []
    for v in views:
        x = D.view(images_u8, v)
        with autocast():
            outs.append(model(x).float())
    return torch.logsumexp(torch.stack(outs), 0) - math.log(len(views))


def _sums(
    model: torch.nn.Module,
    split: D.DeviceSplit,
    indices: torch.Tensor,
    batch: int,
    autocast: Callable[[], AbstractContextManager[Any]],
    views: Sequence[spec.View] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(correct, summed loss, count) over ``indices`` in float64, and the predictions per chunk.
    The sums stay on the device: the caller reads them once, after any reduction over ranks."""
    device = split.labels.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    preds = []
    for chunk in indices.split(batch):
        out, y = _log_probs(model, split.images[chunk], views, autocast), split.labels[chunk]
        pred = out.argmax(1)
        sums += torch.stack(
            [
                (pred == y).sum().double(),
                F.nll_loss(out, y, reduction="sum").double(),
                torch.tensor(len(y), device=device, dtype=torch.float64),
            ]
        )
        preds.append(pred)
    return sums, preds


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    split: D.DeviceSplit,
    accelerator: Accelerator,
    batch: int,
    want_predictions: bool = False,
    views: Sequence[spec.View] | None = None,
) -> dict[str, Any]:
    """Exact-count evaluation: each rank takes a contiguous shard (no padding, no duplicates),
    sums are reduced over ranks, so accuracy counts every sample exactly once for any world size.
    ``views``: test-time augmentation over them (default: the images as they are)."""
    model.eval()
    device, world = accelerator.device, accelerator.num_processes
    idx = D.eval_shard(len(split), world, accelerator.process_index).to(device)
    sums, preds = _sums(model, split, idx, batch, accelerator.autocast, views)
    sums = accelerator.reduce(sums, reduction="sum") if world > 1 else sums
    correct, loss, count = sums.tolist()
    result: dict[str, Any] = {"acc": correct / count, "loss": loss / count, "count": int(count)}
    if want_predictions:
        local = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=device)
        width = math.ceil(len(split) / world)
        padded = torch.full((width,), -1, dtype=torch.long, device=device)
        padded[: len(local)] = local
        gathered = accelerator.gather(padded) if world > 1 else padded
        result["predictions"] = gathered[gathered >= 0].cpu()
    return result


@torch.no_grad()
def _in_process(
    model: torch.nn.Module, split: D.DeviceSplit, batch: int, views: Sequence[spec.View] | None = None
) -> tuple[list[float], torch.Tensor]:
    """(correct, summed loss, count) and every prediction of ``split``, in this process, in full precision."""
    model.eval()
    indices = torch.arange(len(split), device=split.labels.device)
    sums, preds = _sums(model, split, indices, batch, nullcontext, views)
    predictions = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=indices.device)
    return sums.tolist(), predictions


def accuracy(model: torch.nn.Module, split: D.DeviceSplit, batch: int) -> float:
    """The share of ``split`` the model classifies right, in this process, in full precision."""
    (correct, _, count), _ = _in_process(model, split, batch)
    return correct / count


def split_report(
    model: torch.nn.Module, split: D.DeviceSplit, batch: int, views: Sequence[spec.View] | None = None
) -> dict[str, Any]:
    """Accuracy, loss, per-class counts and the confusion counts (rows true, columns predicted) of
    ``split`` (with ``views``: under test-time augmentation): the per-class numbers come from the same
    predictions the accuracy counts."""
    from mnist_dist.plots import confusion_matrix

    (correct, loss, count), predictions = _in_process(model, split, batch, views)
    counts = confusion_matrix(split.labels.cpu(), predictions.cpu())
    right, images = counts.diag().tolist(), counts.sum(1).tolist()
    return {
        "acc": correct / count,
        "loss": loss / count,
        "count": int(count),
        "per_class": [
            {"class": c, "correct": r, "count": n, "acc": r / n if n else None}
            for c, (r, n) in enumerate(zip(right, images, strict=True))
        ],
        "confusion": counts.tolist(),
    }


def evaluate_weights(
    path: Path, data_root: Path, split_seed: int, batch: int, model: str | None = None, tta: bool = False
) -> dict[str, Any]:
    """The weights at ``path`` (a run folder or a weights file) measured on validation and test;
    with ``tta`` also under test-time augmentation, as ``val_tta`` and ``test_tta``. The model runs in
    the memory format a training of it on this device would use, so the numbers are the training's."""
    device = local_device()
    net, name = load_model(path, model)
    net = net.to(device)
    if TrainConfig(model=name).speed(device.type).channels_last:
        net = net.to(memory_format=torch.channels_last)
    splits = D.device_splits(D.load_mnist(data_root), split_seed, device, max_train=1)
    result = {
        "model": name,
        "split_seed": split_seed,
        **{split: split_report(net, splits[split], batch) for split in ("val", "test")},
    }
    if tta:
        result["tta_views"] = [v.name for v in spec.TTA_VIEWS]
        result |= {
            f"{split}_tta": split_report(net, splits[split], batch, spec.TTA_VIEWS)
            for split in ("val", "test")
        }
    return result


def format_report(result: dict[str, Any]) -> str:
    """``evaluate_weights``' result for a terminal: the two accuracy lines (and the two TTA ones, if
    measured), per-class accuracy on both splits, and the test confusion counts."""
    val, test = result["val"], result["test"]
    lines = [
        f"val  {100 * val['acc']:.2f}%  ({val['count']:,} images, split seed {result['split_seed']})",
        f"test {100 * test['acc']:.2f}%  ({test['count']:,} images)",
        *[
            f"{f'{split} ({spec.TTA_LABEL})':<{len(spec.TTA_LABEL) + 7}} {100 * result[f'{split}_tta']['acc']:.2f}%  "
            f"({result[f'{split}_tta']['count']:,} images)"
            for split in ("val", "test")
            if f"{split}_tta" in result
        ],
        "",
        f"{'class':>5}  {'val':>7} {'right/images':>13}  {'test':>7} {'right/images':>13}",
    ]
    for v, t in zip(val["per_class"], test["per_class"], strict=True):
        lines.append(f"{v['class']:>5}  {_class_cells(v)}  {_class_cells(t)}")
    lines += ["", "test confusion counts (rows: true digit, columns: predicted)"]
    width = max(len(f"{n:,}") for row in test["confusion"] for n in row) + 1
    lines.append("     " + "".join(f"{p:>{width}}" for p in range(len(test["confusion"]))))
    for true, row in enumerate(test["confusion"]):
        lines.append(f"{true:>5}" + "".join(f"{n:>{width},}" for n in row))
    return "\n".join(lines)


def _class_cells(row: dict[str, Any]) -> str:
    acc = "-" if row["acc"] is None else f"{100 * row['acc']:.2f}%"
    right = f"{row['correct']:,}/{row['count']:,}"
    return f"{acc:>7} {right:>13}"
