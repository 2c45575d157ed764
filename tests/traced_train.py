"""One rank of a training that also records what the distributed proofs check:

    torchrun --nproc_per_node N -m tests.traced_train TRACE_DIR CONFIG_JSON

CONFIG_JSON holds a TrainConfig (``cfg.to_json()``); each rank writes TRACE_DIR/rank<r>.json with its
world size, the indices of every micro-batch it trained on and the learning rate of every step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from mnist_dist.config import TrainConfig
from mnist_dist.trainer import Hooks, Trainer, train


class RankTrace(Hooks):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.indices: list[list[int]] = []
        self.lr: list[float] = []

    def on_step(self, trainer: Trainer, micro_batches: list[torch.Tensor]) -> None:
        self.indices.append([i for mb in micro_batches for i in mb.tolist()])
        self.lr.append(trainer.optimizer.param_groups[0]["lr"])

    def on_finish(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = {"rank": trainer.rank, "world": trainer.world, "indices": self.indices, "lr": self.lr}
        (self.folder / f"rank{trainer.rank}.json").write_text(json.dumps(trace))


if __name__ == "__main__":
    folder, config = Path(sys.argv[1]), Path(sys.argv[2])
    train(TrainConfig.from_dict(json.loads(config.read_text())), hooks=[RankTrace(folder)])
