"""Which speed settings make the whole training loop fastest on this machine, per model: the
measurement behind ``config.CPU_SPEED``.

    PYTHONPATH=. python .ci/speed_defaults.py --preset default --rounds 3 --json out.json
    PYTHONPATH=. python .ci/speed_defaults.py --preset default --precisions no,bf16   # + bf16 autocast

Each round runs ``python -m mnist_dist.train`` once per setting (eager; channels_last; compile;
compile + channels_last) and precision, one after the other, on the same slice of MNIST for
1 + ``--epochs`` epochs. A run is a process of its own, as a user's is: compiled graphs are never shared between
settings. The first epoch is warm-up (compilation included) and is reported apart; the rate is the
later epochs' (their own timings in metrics.jsonl, which leave out evaluation). Rounds interleave
the settings, so a machine whose speed drifts moves all of them alike, and each round's ratios to
eager (fp32) compare runs a few seconds apart. A setting run under another precision than fp32 is
reported as ``<setting> <precision>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mnist_dist.config import PRECISIONS, PRESETS
from mnist_dist.runfiles import read_metrics

SETTINGS = {
    "eager": ["--no-compile", "--no-channels-last"],
    "channels_last": ["--no-compile", "--channels-last"],
    "compile": ["--compile", "--no-channels-last"],
    "compile+channels_last": ["--compile", "--channels-last"],
}


def run(args: argparse.Namespace, setting: str, precision: str, out: Path, name: str) -> dict[str, float]:
    """One training run; its steady rate and its first epoch's extra seconds."""
    cmd = [
        sys.executable, "-m", "mnist_dist.train", "--preset", args.preset, *(["--model", args.model] if args.model else []),
        "--max-train-samples", str(args.samples), "--epochs", str(1 + args.epochs), "--threads", str(args.threads),
        "--wandb", "disabled", "--output-dir", str(out), "--name", name, *SETTINGS[setting], "--precision", precision,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    epochs = [r for r in read_metrics(out / name) if r["kind"] == "epoch"]
    steady = epochs[1:]
    seconds = statistics.median(r["epoch_seconds"] for r in steady)
    return {
        "images_per_second": sum(r["images_per_second"] * r["epoch_seconds"] for r in steady)
        / sum(r["epoch_seconds"] for r in steady),
        "warmup_seconds": max(0.0, epochs[0]["epoch_seconds"] - seconds),
    }


def label(setting: str, precision: str) -> str:
    return setting if precision == "no" else f"{setting} {precision}"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    runs = [(s, p) for p in args.precisions.split(",") for s in SETTINGS]
    rounds: dict[str, list[dict[str, float]]] = {label(s, p): [] for s, p in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for setting, precision in runs:
                name = f"{label(setting, precision).replace('+', '-').replace(' ', '-')}-{r}"
                rounds[label(setting, precision)].append(run(args, setting, precision, Path(tmp), name))
            line = ", ".join(f"{k} {v[-1]['images_per_second']:,.0f}" for k, v in rounds.items())
            print(f"round {r + 1}: {line} img/s", file=sys.stderr, flush=True)
    eager = [r["images_per_second"] for r in rounds["eager"]]
    results = {}
    for setting, rs in rounds.items():
        ratios = [r["images_per_second"] / e for r, e in zip(rs, eager, strict=True)]
        results[setting] = {
            "images_per_second": statistics.median(r["images_per_second"] for r in rs),
            "ratio_to_eager": statistics.median(ratios),
            "ratio_to_eager_rounds": ratios,
            "warmup_seconds": statistics.median(r["warmup_seconds"] for r in rs),
            "rounds": rs,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=list(PRESETS))
    parser.add_argument("--model", default=None)
    parser.add_argument("--samples", type=int, default=6400, help="images per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per run, after the warm-up one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--precisions", default="no", help="comma-separated --precision values; 'no' = fp32")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    if "no" not in precisions or not set(precisions) <= set(PRECISIONS):
        parser.error(f"--precisions must be from {', '.join(PRECISIONS)} and include 'no' (every ratio is to "
                     f"the round's fp32 eager run), got {args.precisions!r}")  # fmt: skip
    model = args.model or PRESETS[args.preset]().model
    results = measure(args)
    record = {"command": " ".join(sys.argv), "preset": args.preset, "model": model, "threads": args.threads,
              "samples": args.samples, "epochs": args.epochs, "rounds": args.rounds,
              "precisions": precisions, "results": results}  # fmt: skip
    for name, r in results.items():
        print(f"{name:<30}{r['images_per_second']:>8,.0f} img/s  {r['ratio_to_eager']:.3f}x eager  "
              f"warm-up {r['warmup_seconds']:.1f} s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
