"""Append finished run folders to a results file such as docs/results/cpu-training-changes.json.

Each row keeps the run's final val/test from summary.json and every epoch's val and train accuracy
from metrics.jsonl, so the docs' tables can be checked against the runs themselves:
    python docs/experiments/collect_runs.py --change "--elastic 12" --command "mnist-dist sweep ..." \
        --out docs/results/cpu-training-changes.json RUN_DIR...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(folder: Path, change: str, command: str) -> dict:
    s = json.loads((folder / "summary.json").read_text())
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    epochs = [r for r in map(json.loads, lines) if r["kind"] == "epoch"]
    return {
        "change": change,
        "seed": s["seed"],
        "threads": s["threads_per_process"],
        "command": command,
        "epochs_done": len(epochs),
        "final_val": s["val_acc"],
        "test": s["test_acc"],
        "val_by_epoch": [e["val_acc"] for e in epochs],
        "train_acc_by_epoch": [e["train_acc"] for e in epochs],
        "final_val_loss": s["val_loss"],
        "wall_seconds": s["wall_seconds"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--change", required=True, help="What the runs changed, as a table row names it.")
    p.add_argument("--command", required=True, help="The command that produced the runs.")
    p.add_argument("--out", type=Path, required=True, help="Results file with a 'runs' list.")
    p.add_argument("runs", nargs="+", type=Path, help="Finished run folders.")
    a = p.parse_args()
    results = json.loads(a.out.read_text())
    results["runs"] += [row(folder, a.change, a.command) for folder in a.runs]
    a.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
