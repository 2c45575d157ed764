"""Evaluation speed by batch size: the whole 10k validation split, each model in the memory layout
its CPU run trains in (``config.CPU_SPEED``), every batch size once per round, rounds interleaved so
that a busy machine slows all of them alike. Prints a table and writes JSON.

    PYTHONPATH=. python .ci/eval_batch.py --rounds 5 --json docs/bench/cpu-eval-batch-DATE.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from mnist_dist import data as D
from mnist_dist.config import TrainConfig, default_data_dir
from mnist_dist.distributed import device_name
from mnist_dist.evaluate import accuracy
from mnist_dist.model import MODELS, build_model


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="net,net_wider")
    parser.add_argument("--batches", default="2000,1000,500,256,128")
    parser.add_argument("--rounds", type=positive, default=5)
    parser.add_argument("--threads", type=positive, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.json and not args.json.parent.is_dir():
        parser.error(f"--json: folder {str(args.json.parent)!r} does not exist")
    models = args.models.split(",")
    if unknown := [m for m in models if m not in MODELS]:
        parser.error(f"--models: {', '.join(map(repr, unknown))} not among {', '.join(MODELS)}")
    try:
        batches = sorted(
            {int(b) for b in args.batches.split(",")} | {TrainConfig.eval_batch_size}, reverse=True
        )
    except ValueError:
        parser.error(f"--batches must be positive integers like 2000,256; got {args.batches!r}")
    if batches[-1] < 1:
        parser.error(f"--batches must be positive integers like 2000,256; got {args.batches!r}")
    torch.set_num_threads(args.threads)
    val = D.device_splits(D.load_mnist(default_data_dir()), 0, torch.device("cpu"), max_train=1)["val"]
    nets = {}
    for name in models:
        channels_last = TrainConfig(model=name).speed("cpu").channels_last
        net = build_model(name).eval()
        nets[name] = (net.to(memory_format=torch.channels_last) if channels_last else net, channels_last)
    rates: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in nets}
    for _ in range(args.rounds):
        for name, (net, _) in nets.items():
            for batch in batches:
                start = time.perf_counter()
                accuracy(net, val, batch)
                rates[name][batch].append(len(val) / (time.perf_counter() - start))
    print(f"images/s evaluating {len(val):,} images, {args.threads} threads, median of {args.rounds} rounds")
    rows = []
    for name, (_, channels_last) in nets.items():
        for batch in batches:
            median = statistics.median(rates[name][batch])
            ratio = median / statistics.median(rates[name][TrainConfig.eval_batch_size])
            rows.append({"model": name, "channels_last": channels_last, "batch": batch, "images_per_second": median,
                         "rounds": rates[name][batch], "vs_default_batch": ratio})  # fmt: skip
            print(
                f"{name:<10} channels_last={channels_last!s:<5} batch {batch:>5}: {median:8,.0f}  ({ratio:.2f}x)"
            )
    if args.json:
        meta = {"torch": torch.__version__, "device": device_name(torch.device("cpu")), "threads": args.threads,
                "default_batch": TrainConfig.eval_batch_size, "command": shlex.join(["python", *sys.argv])}  # fmt: skip
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
