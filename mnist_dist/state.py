"""Where a run is: every counter and meter on one object, which the checkpointer saves and restores
(the pattern of torchtitan's ``TrainState``).

The position (epoch, step, history, timings) is plain data and goes to JSON; the meters are this
rank's running sums as device tensors, updated inside the step without a host sync, and saved per
rank, so a resumed epoch's train loss and accuracy count every sample exactly once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Meters:
    """One rank's running sums: the epoch's train loss and accuracy, and the log window's loss."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: torch.Tensor
    window_loss: torch.Tensor
    window_seen: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device | str) -> Meters:
        loss = torch.zeros((), device=device)
        count = torch.zeros((), device=device, dtype=torch.long)
        return cls(loss, count, count.clone(), loss.clone(), count.clone())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        """Count one micro-batch: its summed loss, its correct predictions and its size."""
        self.loss_sum += loss_sum
        self.window_loss += loss_sum
        self.correct += correct
        self.seen += n
        self.window_seen += n

    def reset_epoch(self) -> None:
        for t in (self.loss_sum, self.correct, self.seen):
            t.zero_()

    def reset_window(self) -> None:
        self.window_loss.zero_()
        self.window_seen.zero_()


@dataclass
class TrainState:
    """The run's position and this rank's meters. ``state_dict`` splits them into JSON-able data
    (``position``, the same on every rank) and tensors (``meters``, per rank)."""

    meters: Meters
    epoch: int = 0  # the epoch in progress (= epochs completed)
    step_in_epoch: int = 0  # optimizer steps done in that epoch
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per completed epoch
    train_seconds: float = 0.0
    train_images: int = 0
    epoch_seconds: float = 0.0  # time already spent in the epoch in progress

    @property
    def best_val_acc(self) -> float | None:
        return max((r["val_acc"] for r in self.history), default=None)

    def position(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "meters"}

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position(),
            "meters": {k: v.detach().cpu() for k, v in self.meters.tensors().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore in place; the meters keep their device."""
        for name, value in state["position"].items():
            setattr(self, name, value)
        for name, tensor in self.meters.tensors().items():
            tensor.copy_(state["meters"][name])
