"""Accuracy exploration on one GPU: recipes x seeds as parallel single-GPU runs, time-boxed.

Produced the GPU tables of docs/accuracy.md. Run from the checkout (nothing installed):
    PYTHONPATH=. python .ci/gpu_accuracy.py --data-dir DATA --out OUT [--budget 300] [--jobs 12]
Each run is a plain `python -m mnist_dist.train` with final-epoch val/test in its summary.json;
jobs are queued seed-major so that, at the deadline, every recipe has the same number of seeds. A
distilled recipe's teachers (every seed of the recipe it names) are planned too and run first.
Issue 18's candidates: --recipes round5 --jobs 16.
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
DEFAULT = ["--preset", "default"]
# A teacher ensemble: every seed's run of the recipe named in braces, which runs first.
TEACHERS = "{{teachers:{}}}"
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
    # round 5 (issue 18): the default against folded branches, distillation, other alphas and two
    # re-allocations of its parameters (each under 20k)
    "default": DEFAULT,
    "default_branches": [*DEFAULT, "--branches"],
    "net_default": [*DEFAULT, "--model", "net"],  # Net's baseline for the two below
    "net_branches": [*DEFAULT, "--model", "net", "--branches"],
    "net_distilled": [*DEFAULT, "--model", "net", "--distill-from", TEACHERS.format("default")],
    "default_el8": [*DEFAULT, "--elastic", "8"],
    "default_el16": [*DEFAULT, "--elastic", "16"],
    "default_w24x23": [*DEFAULT, "--model", "net_w24x23"],
    "default_w8x25": [*DEFAULT, "--model", "net_w8x25"],
}
ROUNDS = {  # --recipes by the name of a round
    "round5": "default,default_branches,net_default,net_branches,net_distilled,default_el8,default_el16,default_w24x23,"
    "default_w8x25",
}


def teachers_of(args: list[str]) -> str | None:
    """The recipe whose runs a recipe's --distill-from names, if it names one."""
    for arg in args:
        if arg.startswith("{teachers:"):
            return arg[len("{teachers:") : -1]
    return None


def command(
    name: str, seed: int, runs: Path, a: argparse.Namespace, seeds_of: dict[str, list[int]]
) -> list[str]:
    """One run's command line; a student's teachers are the runs of its teacher recipe that finished."""
    args = list(RECIPES[name])
    teacher = teachers_of(args)
    if teacher is not None:
        done = [runs / f"{teacher}-seed{s}" for s in seeds_of[teacher]]
        folders = ",".join(str(d) for d in done if (d / "summary.json").is_file())
        args = [folders if arg == TEACHERS.format(teacher) else arg for arg in args]
    return [
        sys.executable, "-m", "mnist_dist.train", *args, "--seed", str(seed),
        "--name", f"{name}-seed{seed}", "--output-dir", str(runs), "--data-dir", a.data_dir,
        "--wandb", "disabled", *a.extra.split(),
    ]  # fmt: skip


def plan(a: argparse.Namespace) -> dict[str, list[int]]:
    """Recipe -> seeds, from --recipes x --seeds or --jobs-file; teachers are added to the plan."""
    if a.jobs_file:
        seeds_of = {
            n: [int(x) for x in ss.split(",")] for n, ss in (e.split(":") for e in a.jobs_file.split(";"))
        }
    else:
        seeds = [int(s) for s in a.seeds.split(",")]
        seeds_of = {name: seeds for name in ROUNDS.get(a.recipes, a.recipes).split(",")}
    for name in list(seeds_of):
        teacher = teachers_of(RECIPES.get(name, []))
        if teacher is not None and teacher not in seeds_of:
            seeds_of = {teacher: seeds_of[name], **seeds_of}
    return seeds_of


def run_all(a: argparse.Namespace, seeds_of: dict[str, list[int]], runs: Path) -> dict[str, float]:
    """The runs, at most --jobs at a time, seed-major; a student starts once its teachers ended."""
    seeds = sorted({s for ss in seeds_of.values() for s in ss})
    queue = [(n, s) for s in seeds for n in seeds_of if s in seeds_of[n]]
    running: dict[tuple[str, int], tuple[subprocess.Popen, float]] = {}
    durations: dict[str, float] = {}
    deadline = time.time() + a.budget

    def waiting(name: str) -> bool:
        teacher = teachers_of(RECIPES[name])
        pending = {k[0] for k in running} | {n for n, _ in queue}
        return teacher is not None and teacher in pending

    while (queue or running) and time.time() < deadline:
        for name, seed in [job for job in queue if not waiting(job[0])][: a.jobs - len(running)]:
            queue.remove((name, seed))
            log = open(runs / f"{name}-seed{seed}.log", "w")  # noqa: SIM115
            cmd = command(name, seed, runs, a, seeds_of)
            running[(name, seed)] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time())
        for key, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                durations[f"{key[0]}-seed{key[1]}"] = time.time() - t0
                del running[key]
        time.sleep(0.5)
    for proc, _ in running.values():
        proc.kill()
    return durations


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
    p.add_argument("--runs", default="gpu_runs", help="Folder of the run folders.")
    a = p.parse_args()
    seeds_of = plan(a)
    if unknown := [name for name in seeds_of if name not in RECIPES]:
        p.error(f"unknown recipes {', '.join(unknown)}; known: {', '.join([*ROUNDS, *RECIPES])}")
    runs = Path(a.runs)
    runs.mkdir(exist_ok=True)
    durations = run_all(a, seeds_of, runs)
    results = {}
    for name, seeds in seeds_of.items():
        rows = []
        for seed in seeds:
            f = runs / f"{name}-seed{seed}" / "summary.json"
            if f.is_file():
                s = json.loads(f.read_text())
                keys = ("val_acc", "test_acc", "wall_seconds", "train_seconds", "best_epoch", "params")
                rows.append({"seed": seed, **{k: s.get(k) for k in keys}})
        results[name] = {"args": RECIPES[name], "runs": rows, "stats": aggregate(rows)}
    device = os.popen("nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null").read().strip()
    out = {
        "device": device or "no nvidia-smi",
        "jobs": a.jobs,
        "budget_s": a.budget,
        "extra": a.extra,
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
