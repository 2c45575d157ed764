"""What one optimizer step updates besides the weights' gradients: the optimizer, the OneCycle
schedule and the exponential moving average of the weights."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from mnist_dist.config import TrainConfig


def build_optimizer(
    cfg: TrainConfig, params: Iterable[torch.nn.Parameter], lr_scale: float, tensor_hparams: bool = False
) -> torch.optim.Optimizer:
    """Adam or Nesterov SGD. With ``tensor_hparams`` the learning rate and Adam's betas are 0-dim
    tensors on the parameters' device (changed in place by ``OneCycle``, never replaced), so a compiled
    or graph-captured step reads the new values without recompiling; Adam is then fused (on CUDA
    capturable and foreach)."""
    params = list(params)
    device = params[0].device

    def hparam(value: float) -> float | torch.Tensor:
        return torch.tensor(value, dtype=torch.float32, device=device) if tensor_hparams else value

    lr = hparam(cfg.lr * lr_scale)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    if not tensor_hparams:
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    kinds = {"capturable": True, "foreach": True} if device.type == "cuda" else {"fused": True}
    betas = (hparam(OneCycle.MAX_MOMENTUM), hparam(0.999))
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay, **kinds)


class OneCycle:
    """torch's ``OneCycleLR`` (two phases, cosine annealing, Adam's beta1 or SGD's momentum cycled
    between 0.95 and 0.85), computed by the same float64 arithmetic, so every step's values equal
    torch's exactly. Unlike torch's, it writes them in place where the optimizer holds tensors: a
    captured graph keeps reading the same memory, and torch.compile sees no new constant per step.
    Its state is the step count, under torch's key (``last_epoch``)."""

    MAX_MOMENTUM, BASE_MOMENTUM = 0.95, 0.85

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_lr: float,
        total_steps: int,
        pct_start: float,
        div_factor: float,
        final_div_factor: float,
    ) -> None:
        self.optimizer, self.total_steps = optimizer, total_steps
        self.initial_lr = max_lr / div_factor
        self.max_lr, self.min_lr = max_lr, self.initial_lr / final_div_factor
        self.warmup_end = float(pct_start * total_steps) - 1
        self.last_epoch = 0
        # What each group holds its LR and momentum in (tensors are kept and filled, never replaced).
        self._held = [
            (g["lr"], g["betas"][0] if "betas" in g else g["momentum"]) for g in optimizer.param_groups
        ]
        self._apply()

    def values(self, step: int) -> tuple[float, float]:
        """The learning rate and momentum (beta1) of optimizer step ``step`` (0-based)."""
        if step <= self.warmup_end:
            pct = step / self.warmup_end
            lrs, moms = (self.initial_lr, self.max_lr), (self.MAX_MOMENTUM, self.BASE_MOMENTUM)
        else:
            pct = (step - self.warmup_end) / (self.total_steps - 1 - self.warmup_end)
            lrs, moms = (self.max_lr, self.min_lr), (self.BASE_MOMENTUM, self.MAX_MOMENTUM)
        return _cos_anneal(*lrs, pct), _cos_anneal(*moms, pct)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [self.values(self.last_epoch)[0]]

    def state_dict(self) -> dict[str, int]:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self._apply()

    def _apply(self) -> None:
        if self.last_epoch > self.total_steps:
            raise ValueError(f"stepped {self.last_epoch} times; the schedule has {self.total_steps} steps")
        lr, momentum = self.values(self.last_epoch)
        for group, (lr_held, momentum_held) in zip(self.optimizer.param_groups, self._held, strict=True):
            group["lr"] = _set(lr_held, lr)
            if "betas" in group:
                group["betas"] = (_set(momentum_held, momentum), *group["betas"][1:])
            else:
                group["momentum"] = _set(momentum_held, momentum)


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _set(held: float | torch.Tensor, value: float) -> float | torch.Tensor:
    """The value in the holder's kind: a tensor is filled in place and put back (the same object even
    after ``optimizer.load_state_dict`` replaced the group's), a float replaced."""
    if isinstance(held, torch.Tensor):
        return held.fill_(value)
    return value


def build_schedule(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int, lr_scale: float
) -> OneCycle:
    """OneCycle over the optimizer steps the run really takes. It is never passed through
    ``accelerator.prepare``, which would step it once per process at every step."""
    return OneCycle(
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
