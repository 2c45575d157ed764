"""Does recalibrating BatchNorm statistics before evaluation help? (docs/accuracy.md)

For each finished run folder: evaluate its saved final weights as saved, then after replacing every
BatchNorm running mean/variance by the exact average over the 50k training images, once clean and
once with the run's own training augmentation. The weights are not touched, so the three numbers
differ only by the BatchNorm statistics.

    python docs/experiments/bn_recalibration.py --data-dir DATA runs/default-seed1 runs/...
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn

from mnist_dist import data as D
from mnist_dist.evaluate import accuracy
from mnist_dist.model import Net, build_model
from mnist_dist.weights import load_state_dict


def recalibrate(net: Net, train: D.DeviceSplit, cfg: dict, augmented: bool, batch: int = 500) -> None:
    """Exact (cumulative) BatchNorm statistics over the whole training split, by torch's own
    `update_bn` (the one SWA uses), fed shuffled batches, clean or augmented as the run trained."""
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=gen)

    def batches() -> Iterator[torch.Tensor]:
        for lo in range(0, len(train), batch):
            images = train.images[order[lo : lo + batch]]
            if augmented:
                yield D.augment(
                    images, gen, cfg["rotate"], cfg["translate"], cfg["scale"], cfg["interpolation"]
                )
            else:
                yield D.normalize(images)

    update_bn(batches(), net)
    net.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("runs", type=Path, nargs="+")
    args = p.parse_args()
    splits = D.device_splits(D.load_mnist(args.data_dir), 0, torch.device("cpu"))
    for run in args.runs:
        cfg = json.loads((run / "config.json").read_text())
        state = load_state_dict(run / "model.safetensors")
        row: dict = {"run": str(run), "model": cfg["model"], "seed": cfg["seed"]}
        for mode in ("as_saved", "recalibrated_clean", "recalibrated_augmented"):
            net = build_model(cfg["model"])
            net.load_state_dict(state)
            if mode != "as_saved":
                recalibrate(net, splits["train"], cfg, augmented=mode.endswith("augmented"))
            row[mode] = {
                "val": round(100 * accuracy(net, splits["val"], 2000), 2),
                "test": round(100 * accuracy(net, splits["test"], 2000), 2),
            }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
