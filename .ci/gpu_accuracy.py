"""Accuracy exploration on one GPU: recipes x seeds as parallel single-GPU runs, time-boxed.

Produced the GPU tables of docs/accuracy.md. Run from the checkout (nothing installed):
    PYTHONPATH=. python .ci/gpu_accuracy.py --data-dir DATA --out OUT [--budget 300] [--jobs 12]
Each run is a plain `python -m mnist_dist.train` with final-epoch val/test in its summary.json;
jobs are queued seed-major so that, at the deadline, every recipe has the same number of seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mnist_dist.sweep import aggregate

BASE = ["--preset", "reference"]
CANDIDATE = [*BASE, "--translate", "2", "--interpolation", "bilinear", "--max-lr", "0.01", "--ema", "0.999"]
WIDE = [*CANDIDATE, "--model", "net_wide"]
WIDER_NEAREST = [*CANDIDATE, "--model", "net_wider", "--interpolation", "nearest"]
RECIPES: dict[str, list[str]] = {
    # round 1: Net (8,440 parameters)
    "reference": BASE,
    "t2_lr01_ema": CANDIDATE,
    "t2_lr01": [*CANDIDATE, "--ema", "0"],
    "t2_lr01_ema_scale01": [*CANDIDATE, "--scale", "0.1"],
    "t2_lr02_ema": [*CANDIDATE, "--max-lr", "0.02"],
    "t2_lr01_ema_ls005": [*CANDIDATE, "--label-smoothing", "0.05"],
    "t2_sgd01_ema": [*CANDIDATE, "--optimizer", "sgd", "--max-lr", "0.1", "--weight-decay", "5e-4"],
    "t2_lr01_ema_b64": [*CANDIDATE, "--batch-size", "64"],
    "t3_r10_lr01_ema": [*CANDIDATE, "--translate", "3", "--rotate", "10"],
    "t2_lr01_ema_nearest": [*CANDIDATE, "--interpolation", "nearest"],
    # round 2: net_wide (18,708 parameters), same layout with 1.5x channels
    "wide_reference": [*BASE, "--model", "net_wide"],
    "wide_t2_lr01_ema": WIDE,
    "wide_t2_lr02_ema": [*WIDE, "--max-lr", "0.02"],
    "wide_t2_lr01_ema_nearest": [*WIDE, "--interpolation", "nearest"],
    # round 3: more seeds, and net_wider (19,616 parameters)
    "wide_t2_lr01_ema_nearest_scale01": [*WIDE, "--interpolation", "nearest", "--scale", "0.1"],
    "wider_t2_lr01_ema_nearest": WIDER_NEAREST,
    "wider_t2_lr01_ema": [*CANDIDATE, "--model", "net_wider"],
    # round 4 (not run on a GPU yet; alpha 12 is the default since 2026-11-27, measured on the CPU)
    "wider_t2_lr01_ema_nearest_el8": [*WIDER_NEAREST, "--elastic", "8"],
    "wider_t2_lr01_ema_nearest_el12": [*WIDER_NEAREST, "--elastic", "12"],
    "wider_t2_lr01_ema_nearest_el16": [*WIDER_NEAREST, "--elastic", "16"],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=300)
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--seeds", default="1,2,3,4")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--jobs-file", help="Explicit name:seed,seed;... list instead of recipes x seeds.")
    p.add_argument("--extra", default="", help="Options appended to every run (smoke tests).")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    names = a.recipes.split(",")
    runs = Path("gpu_runs")
    runs.mkdir(exist_ok=True)
    queue = [(name, seed) for seed in seeds for name in names]
    if a.jobs_file:
        plan = {
            n: [int(x) for x in ss.split(",")] for n, ss in (e.split(":") for e in a.jobs_file.split(";"))
        }
        names, seeds = list(plan), sorted({s for ss in plan.values() for s in ss})
        queue = [(n, s) for s in seeds for n in names if s in plan[n]]
    running: dict[tuple[str, int], tuple[subprocess.Popen, float]] = {}
    durations: dict[str, float] = {}
    deadline = time.time() + a.budget
    while (queue or running) and time.time() < deadline:
        while queue and len(running) < a.jobs:
            name, seed = queue.pop(0)
            cmd = [
                sys.executable, "-m", "mnist_dist.train", *RECIPES[name], "--seed", str(seed),
                "--name", f"{name}-seed{seed}", "--output-dir", str(runs), "--data-dir", a.data_dir,
                "--wandb", "disabled", *a.extra.split(),
            ]  # fmt: skip
            log = open(runs / f"{name}-seed{seed}.log", "w")  # noqa: SIM115
            running[(name, seed)] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time())
        for key, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                durations[f"{key[0]}-seed{key[1]}"] = time.time() - t0
                del running[key]
        time.sleep(0.5)
    for proc, _ in running.values():
        proc.kill()
    results = {}
    for name in names:
        rows = []
        for seed in seeds:
            f = runs / f"{name}-seed{seed}" / "summary.json"
            if f.is_file():
                s = json.loads(f.read_text())
                rows.append(
                    {"seed": seed, **{k: s[k] for k in ("val_acc", "test_acc", "wall_seconds", "best_epoch")}}
                )
        results[name] = {"args": RECIPES[name], "runs": rows, "stats": aggregate(rows)}
    device = os.popen("nvidia-smi --query-gpu=name --format=csv,noheader").read().strip()
    out = {
        "device": device,
        "jobs": a.jobs,
        "budget_s": a.budget,
        "durations_s": durations,
        "recipes": results,
    }
    Path(a.out).write_text(json.dumps(out, indent=2))
    for name, r in results.items():
        st = r["stats"]
        if st:
            print(
                f"{name:24} n={len(r['runs'])} val {100 * st['val_acc']['mean']:.2f}±{100 * st['val_acc']['std']:.2f} "
                f"min {100 * st['val_acc']['min']:.2f}  test {100 * st['test_acc']['mean']:.2f} min "
                f"{100 * st['test_acc']['min']:.2f}  wall {st['wall_seconds']['mean']:.0f}s"
            )
        else:
            print(f"{name:24} no finished runs")


if __name__ == "__main__":
    main()
