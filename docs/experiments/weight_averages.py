"""Which average of the weights should the default evaluate? (docs/accuracy.md)

Trains one run of the default preset and, beside the preset's EMA (decay 0.999), keeps other
averages of the *same* trajectory: EMAs with other decays and uniform averages of every step of
the last 5, 3 or 2 epochs. Averaging never feeds back into training, so one run compares them all,
paired: the training seed, the batches, the augmentation and the updates are identical; only the
averaging differs. Writes each average's weights and a JSON of val/test accuracy.

    python docs/experiments/weight_averages.py --data-dir DATA --seed 3 --threads 1 --out OUT
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import mnist_dist.trainer as T
from mnist_dist import config, data
from mnist_dist.evaluate import accuracy

EMA_DECAYS = (0.998, 0.9995, 0.9998)
TAIL_EPOCHS = (5, 3, 2)
PresetEMA = T.EMA  # the Trainer builds T.EMA; main() swaps in ManyAverages


class ManyAverages(PresetEMA):
    """The preset's EMA (what the run itself evaluates) plus the extra averages, updated together."""

    last: ManyAverages | None = None

    def __init__(self, net: torch.nn.Module, decay: float, steps_per_epoch: int, epochs: int) -> None:
        super().__init__(net, decay)
        self.live = net
        self.emas = {f"ema{d}": PresetEMA(net, d) for d in EMA_DECAYS}
        self.tail_start = {f"tail{k}": (epochs - k) * steps_per_epoch for k in TAIL_EPOCHS}
        self.tails: dict[str, torch.nn.Module] = {}
        self.counts: dict[str, int] = {}
        ManyAverages.last = self

    @torch.no_grad()
    def update(self, step: int) -> None:
        super().update(step)
        for ema in self.emas.values():
            ema.update(step)
        for name, start in self.tail_start.items():
            if step <= start:
                continue
            if name not in self.tails:
                self.tails[name], self.counts[name] = copy.deepcopy(self.live), 1
                continue
            self.counts[name] += 1
            live = self.live.state_dict().values()
            for avg, now in zip(self.tails[name].state_dict().values(), live, strict=True):
                if avg.is_floating_point():
                    avg.add_((now - avg) / self.counts[name])
                else:
                    avg.copy_(now)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=None, help="shorter runs (smoke checks)")
    p.add_argument("--max-train-samples", type=int, default=None, help="smaller runs (smoke checks)")
    args = p.parse_args()
    cfg = config.from_preset(
        "default",
        seed=args.seed,
        threads=args.threads,
        wandb="disabled",
        output_dir=str(args.out),
        name=f"seed{args.seed}",
        data_dir=str(args.data_dir),
        epochs=args.epochs,
        max_train_samples=args.max_train_samples,
    ).validate()
    n_train = cfg.max_train_samples or 50_000
    steps_per_epoch = data.ShardedSampler(n_train, cfg.batch_size, 1, 0, cfg.seed).steps_per_epoch()
    T.EMA = lambda net, decay: ManyAverages(net, decay, steps_per_epoch, cfg.epochs)  # type: ignore[misc]
    summary = T.train(cfg)
    avg = ManyAverages.last
    assert avg is not None
    splits = data.device_splits(data.load_mnist(args.data_dir), cfg.split_seed, torch.device("cpu"))
    result = {"seed": args.seed, "run": {"val": summary["val_acc"], "test": summary["test_acc"]}}
    nets = {"ema0.999": avg.module, "live": avg.live, **{k: e.module for k, e in avg.emas.items()}}
    for name, net in {**nets, **avg.tails}.items():
        T.save_weights(net, args.out / f"seed{args.seed}-{name}.safetensors")
        result[name] = {
            "val": accuracy(net, splits["val"], 2000),
            "test": accuracy(net, splits["test"], 2000),
        }
        print(name, result[name], flush=True)
    (args.out / f"seed{args.seed}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
