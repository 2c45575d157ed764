"""Measuring a model on a split: the training's exact-count evaluation over its ranks, and the
evaluation of saved weights in one process. Both run the same per-chunk arithmetic (``_sums``), so a
run's reported accuracy and ``mnist-dist evaluate`` of its weights count the same way."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from mnist_dist import data as D
from mnist_dist.weights import load_model


def _sums(
    model: torch.nn.Module,
    split: D.DeviceSplit,
    indices: torch.Tensor,
    batch: int,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(correct, summed loss, count) over ``indices`` in float64, and the predictions per chunk.
    The sums stay on the device: the caller reads them once, after any reduction over ranks."""
    device = split.labels.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    preds = []
    for chunk in indices.split(batch):
        x, y = D.normalize(split.images[chunk]), split.labels[chunk]
        with autocast():
            out = model(x).float()
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
) -> dict[str, Any]:
    """Exact-count evaluation: each rank takes a contiguous shard (no padding, no duplicates),
    sums are reduced over ranks, so accuracy counts every sample exactly once for any world size."""
    model.eval()
    device, world = accelerator.device, accelerator.num_processes
    idx = D.eval_shard(len(split), world, accelerator.process_index).to(device)
    sums, preds = _sums(model, split, idx, batch, accelerator.autocast)
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
def accuracy(model: torch.nn.Module, split: D.DeviceSplit, batch: int) -> float:
    """The share of ``split`` the model classifies right, in this process, in full precision."""
    model.eval()
    indices = torch.arange(len(split), device=split.labels.device)
    correct, _, count = _sums(model, split, indices, batch, nullcontext)[0].tolist()
    return correct / count


def evaluate_weights(
    path: Path, data_root: Path, split_seed: int, batch: int, model: str | None = None
) -> dict[str, Any]:
    """Validation and test accuracy of the weights at ``path`` (a run folder or a weights file)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, name = load_model(path, model)
    net = net.to(device)
    splits = D.device_splits(D.load_mnist(data_root), split_seed, device, max_train=1)
    return {
        "model": name,
        "val_acc": accuracy(net, splits["val"], batch),
        "val_count": len(splits["val"]),
        "test_acc": accuracy(net, splits["test"], batch),
        "test_count": len(splits["test"]),
    }
