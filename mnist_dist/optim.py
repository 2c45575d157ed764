"""What one optimizer step updates besides the weights' gradients: the optimizer, the OneCycle
schedule and the exponential moving average of the weights."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from mnist_dist.config import TrainConfig


def build_optimizer(
    cfg: TrainConfig, params: Iterable[torch.nn.Parameter], lr_scale: float
) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr * lr_scale, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(params, lr=cfg.lr * lr_scale, weight_decay=cfg.weight_decay)


def build_schedule(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int, lr_scale: float
) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycleLR over the optimizer steps the run really takes. It is never passed through
    ``accelerator.prepare``, which would step it once per process at every step."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.max_lr * lr_scale,
        total_steps=total_steps,
        pct_start=cfg.pct_start,
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
    )


def optimizer_stepper(optimizer: AcceleratedOptimizer, accelerator: Accelerator) -> torch.optim.Optimizer:
    """What the loop calls `step`/`zero_grad` on. Without a loss scaler (fp32, bf16) Accelerate's
    wrapper does nothing this loop needs (the loop accumulates gradients itself), yet searches
    packages and inspects signatures on every step; so the loop steps torch's optimizer. fp16
    keeps the wrapper, whose GradScaler it needs."""
    return optimizer if accelerator.scaler is not None else optimizer.optimizer


class EMA:
    """Exponential moving average of the weights and BatchNorm statistics, with the usual warm-up
    (decay grows as (1+t)/(10+t)) so short runs are not dominated by the initial weights.
    One fused lerp per step and no host sync (torch's AveragedModel syncs on every update)."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.module, self.decay = copy.deepcopy(net), decay
        pairs = list(zip(self.module.state_dict().values(), net.state_dict().values(), strict=True))
        self._floats = (
            [e for e, m in pairs if e.is_floating_point()],
            [m for e, m in pairs if m.is_floating_point()],
        )
        self._counters = [(e, m) for e, m in pairs if not e.is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._floats[0], self._floats[1], 1 - d)
        for e, m in self._counters:
            e.copy_(m)
