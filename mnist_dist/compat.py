"""Which checkpoints a run may resume from: the same computation, wherever and however fast it runs.

A resume may change where and how the run executes, never what it computes. The global batch
(samples per optimizer step) must stay: world size, --batch-size and --grad-accum may change only
together so that it does. Every other config field must match, so a field added later is protected
without an edit here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from mnist_dist.config import ConfigError, TrainConfig

MAY_CHANGE = frozenset(
    {
        "batch_size",
        "global_batch_size",
        "grad_accum",
        "data_dir",
        "eval_batch_size",
        "output_dir",
        "name",
        "compile",
        "channels_last",
        "cuda_graph",
        "tta",  # the final evaluation only
        "threads",
        "deterministic",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "resume",
        "requeue",
    }
)
_MAY_CHANGE_PREFIX = "wandb"  # tracking only


def run_plan(cfg: TrainConfig, net: torch.nn.Module, world: int, steps_per_epoch: int) -> dict[str, Any]:
    """What the run computes beyond its config: saved with each checkpoint, compared on resume
    (all but ``world_size``, which may change)."""
    return {
        "model": type(net).__name__,
        "params": sum(p.numel() for p in net.parameters()),
        "global_batch": cfg.per_process_batch(world) * world * cfg.grad_accum,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * cfg.epochs,
        "world_size": world,
    }


def check_compatible(saved: dict[str, Any], cfg: TrainConfig, plan: dict[str, Any], source: Path) -> None:
    """Refuse a checkpoint whose run computes something else; the message names every difference."""
    old = TrainConfig.from_dict(saved["config"])
    diffs = [
        f"--{f.name.replace('_', '-')} {getattr(old, f.name)!r} in the checkpoint, {getattr(cfg, f.name)!r} now"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in MAY_CHANGE
        and not f.name.startswith(_MAY_CHANGE_PREFIX)
        and getattr(old, f.name) != getattr(cfg, f.name)
    ]
    diffs += [
        f"{key.replace('_', ' ')} {saved['plan'].get(key)!r} in the checkpoint, {value!r} now"
        for key, value in plan.items()
        if key != "world_size" and saved["plan"].get(key) != value
    ]
    if diffs:
        raise ConfigError(
            f"checkpoint {source} belongs to a different run: " + "; ".join(diffs) + ". A resume may change "
            "the number of processes/nodes, --batch-size and --grad-accum (keeping the global batch, e.g. "
            "with --global-batch-size), and where and how fast it runs; nothing that changes the result."
        )
