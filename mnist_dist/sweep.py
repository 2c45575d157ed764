"""Several training seeds of one recipe, each a full run, summarised honestly: final-epoch
accuracy (never the best epoch) on validation and test, per seed and as mean/std/min/max.

    mnist-dist sweep --preset default --seeds 1,2,3 --jobs 2
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any

from mnist_dist import env, runfiles
from mnist_dist.config import TrainConfig
from mnist_dist.files import write_text_atomic
from mnist_dist.spec import TTA_LABEL

STATS = ("val_acc", "test_acc", "wall_seconds")
TTA_STATS = ("val_tta_acc", "test_tta_acc")  # a sweep with --tta: the same runs' TTA results, labelled


def seed_run_name(base: str, seed: int) -> str:
    return f"{base}-seed{seed}"


def seed_config(cfg: TrainConfig, seed: int, jobs: int, cuda: bool) -> TrainConfig:
    """One seed's run: its seed, its own folder and, on a CPU, the --threads asked for or else an
    equal share of the cores among the runs that train at the same time."""
    threads = cfg.threads
    if threads is None and not cuda:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    return cfg.replace(seed=seed, name=seed_run_name(cfg.name or cfg.preset, seed), threads=threads)


def _start(run: TrainConfig, config_dir: Path) -> subprocess.Popen:
    """The run as its own process, reading its config from a file as every rank does."""
    config = write_text_atomic(config_dir / f"{run.name}.json", run.to_json())
    child_env = {k: v for k, v in os.environ.items() if k not in env.LAUNCHER_VARS}
    log = open(Path(run.output_dir) / f"{run.name}.log", "w")  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_dist.train", "--config", str(config)],
        env=child_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@contextmanager
def _stop_runs_on_exit(running: dict[int, subprocess.Popen]) -> Iterator[None]:
    """A sweep stopped by Ctrl-C or SIGTERM stops its runs and waits for them, instead of leaving
    them training. Each gets SIGTERM, on which a run that is training writes a checkpoint and exits."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if in_main else None
    try:
        yield
    finally:
        for proc in running.values():
            with suppress(ProcessLookupError):
                proc.terminate()
        for proc in running.values():
            proc.wait()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def run_sweep(cfg: TrainConfig, seeds: list[int], jobs: int = 1) -> dict[str, Any]:
    """Run one process per seed, at most ``jobs`` at a time; collect each run's summary.json."""
    import torch

    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    failed = _run_all([seed_config(cfg, seed, jobs, cuda) for seed in seeds], jobs)
    keys = (*STATS, *(TTA_STATS if cfg.tta else ()), "best_epoch", "best_val_acc", "epochs")
    rows = []
    for seed in seeds:
        s = runfiles.read_summary(Path(cfg.output_dir) / seed_run_name(cfg.name or cfg.preset, seed))
        if seed not in failed and s is not None:
            rows.append({"seed": seed, **{k: s[k] for k in keys}})
    return {
        "config": cfg.to_dict(),
        "seeds": seeds,
        "failed_seeds": failed,
        "runs": rows,
        "stats": aggregate(rows),
        "sweep_seconds": time.perf_counter() - start,
    }


def _run_all(runs: list[TrainConfig], jobs: int) -> list[int]:
    """Train the runs, ``jobs`` at a time, each from a config file in a folder the sweep owns;
    return the seeds whose run failed."""
    pending, running, failed = list(runs), {}, []
    with tempfile.TemporaryDirectory(prefix="mnist-dist-sweep-") as config_dir, _stop_runs_on_exit(running):
        while pending or running:
            while pending and len(running) < jobs:
                run = pending.pop(0)
                running[run.seed] = _start(run, Path(config_dir))
            for seed, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[seed]
                    if proc.returncode:
                        failed.append(seed)
            time.sleep(0.5)
    return failed


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, std, min and max of each of STATS, and of TTA_STATS where the rows hold them."""
    out = {}
    for key in (*STATS, *TTA_STATS):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
    return out


def format_table(result: dict[str, Any]) -> str:
    """One line per seed, then the stats; a sweep with --tta adds its TTA columns, labelled."""
    accs = [("val_acc", "final val"), ("test_acc", "test")]
    if result["runs"] and TTA_STATS[0] in result["runs"][0]:
        accs += [("val_tta_acc", "val, TTA"), ("test_tta_acc", "test, TTA")]
    widths = [max(8, len(header) + 1) for _, header in accs]

    def line(first: object, values: list[float], best: object, wall: str) -> str:
        cells = [f"{100 * v:>{w - 1}.2f}%" for v, w in zip(values, widths, strict=True)]
        return f"{first:>6} {' '.join(cells)} {best:>8} {wall:>8}"

    header = " ".join(f"{h:>{w}}" for (_, h), w in zip(accs, widths, strict=True))
    lines = [f"{'seed':>6} {header} {'best ep':>8} {'wall s':>8}"]
    for r in result["runs"]:
        lines.append(line(r["seed"], [r[k] for k, _ in accs], r["best_epoch"], f"{r['wall_seconds']:.1f}"))
    st = result["stats"]
    if "val_acc" in st:
        for stat in ("mean", "std", "min", "max"):
            lines.append(line(stat, [st[k][stat] for k, _ in accs], "", f"{st['wall_seconds'][stat]:.1f}"))
    if len(accs) > 2:
        lines.append(f"{TTA_LABEL}: the same weights under test-time augmentation; the headline is final val")
    if result["failed_seeds"]:
        lines.append(f"FAILED seeds: {result['failed_seeds']} (see the .log files in the output dir)")
    return "\n".join(lines)
