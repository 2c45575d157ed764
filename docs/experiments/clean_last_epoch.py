"""Does a last epoch without augmentation help? (docs/accuracy.md)

Continues finished runs from their checkpoint at the start of the last epoch, with augmentation off
(--rotate 0 --translate 0 --scale 0 --elastic 0) for that epoch only. Everything before it is the
run's own trajectory (weights, optimizer, schedule, EMA, random streams), so the result is paired
with the run's own final epoch. A resume refuses a changed recipe, so the checkpoint is copied into
a new run folder, its recipe edited and its manifest re-hashed. Prints and writes one JSON line per run.

    python docs/experiments/clean_last_epoch.py --data-dir DATA --out OUT RUN_DIR...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import mnist_dist.trainer as T
from mnist_dist import checkpoint_format as C
from mnist_dist.config import TrainConfig

CLEAN = {"rotate": 0.0, "translate": 0.0, "scale": 0.0, "elastic": 0.0}


def last_epoch_checkpoint(run: Path) -> Path:
    """The run's checkpoint taken at the end of its second-to-last epoch."""
    for ckpt in C.candidates(run / "checkpoints"):
        state = json.loads((ckpt / C.STATE).read_text())
        if state["state"]["epoch"] == state["config"]["epochs"] - 1 and not state["state"]["step_in_epoch"]:
            return ckpt
    raise SystemExit(f"{run} keeps no checkpoint from the start of its last epoch")


def clean_copy(run: Path, out: Path, data_dir: Path) -> TrainConfig:
    """Copy the checkpoint into OUT/<run>-clean with the augmentation turned off; the config to resume."""
    src = last_epoch_checkpoint(run)
    name = f"{run.name}-clean"
    dst = out / name / "checkpoints" / src.name
    shutil.copytree(src, dst)
    shutil.copy(run / "metrics.jsonl", out / name / "metrics.jsonl")
    state = json.loads((dst / C.STATE).read_text())
    state["config"].update(CLEAN, name=name, output_dir=str(out))
    (dst / C.STATE).write_text(json.dumps(state, indent=1))
    manifest = json.loads((dst / C.MANIFEST).read_text())
    body = (dst / C.STATE).read_bytes()
    manifest["files"][C.STATE] = {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    (dst / C.MANIFEST).write_text(json.dumps(manifest, indent=1))
    return TrainConfig.from_dict(state["config"]).replace(
        resume=str(dst), data_dir=str(data_dir), wandb="disabled"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("runs", type=Path, nargs="+", help="finished run folders")
    args = p.parse_args()
    results = []
    for run in args.runs:
        saved = json.loads((run / "summary.json").read_text())
        summary = T.train(clean_copy(run, args.out, args.data_dir).validate())
        row = {
            "run": run.name,
            "seed": saved["seed"],
            "as_saved": {"val": saved["val_acc"], "test": saved["test_acc"]},
            "clean_last_epoch": {"val": summary["val_acc"], "test": summary["test_acc"]},
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    with (args.out / "clean_last_epoch.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
