"""The OneCycle schedule against torch's OneCycleLR, step by step, with float and with tensor
hyperparameters (the graph-ready step's), and its state across a checkpoint."""

from __future__ import annotations

import pytest
import torch

from mnist_dist.config import TrainConfig
from mnist_dist.optim import OneCycle, build_optimizer, build_schedule

pytestmark = pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")

SCHEDULE = {"max_lr": 0.01, "div_factor": 25.0, "final_div_factor": 1e4}


def params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3))]


def momentum(group: dict) -> float | torch.Tensor:
    return group["betas"][0] if "betas" in group else group["momentum"]


def torch_values(optimizer: torch.optim.Optimizer, total: int, pct_start: float) -> list[tuple[float, float]]:
    """What torch's own scheduler gives at every step: (lr, beta1 or momentum)."""
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, total_steps=total, pct_start=pct_start, **SCHEDULE
    )
    group, values = optimizer.param_groups[0], []
    for step in range(total):
        values.append((group["lr"], momentum(group)))
        if step < total - 1:
            scheduler.step()
    return values


def our_values(optimizer: torch.optim.Optimizer, total: int, pct_start: float) -> list[tuple[float, float]]:
    schedule = OneCycle(optimizer, total_steps=total, pct_start=pct_start, **SCHEDULE)
    group, values = optimizer.param_groups[0], []
    for step in range(total):
        values.append((float(group["lr"]), float(momentum(group))))
        assert schedule.get_last_lr() == [schedule.values(step)[0]]
        if step < total - 1:
            schedule.step()
    return values


OPTIMIZERS = {
    "adam": lambda: torch.optim.Adam(params(), lr=5e-4),
    "sgd": lambda: torch.optim.SGD(params(), lr=5e-4, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("total", [3, 10, 17, 391, 7429])
@pytest.mark.parametrize("pct_start", [0.05, 0.2, 0.25, 0.3, 0.5, 0.9])
def test_every_step_equals_torchs_one_cycle(kind: str, total: int, pct_start: float) -> None:
    """Exactly torch's values (==, not approximately) for Adam's beta1 and SGD's momentum alike."""
    if pct_start * total == 1:
        pytest.skip("a one-step warm-up, which the config refuses (torch divides by zero)")
    assert our_values(OPTIMIZERS[kind](), total, pct_start) == torch_values(
        OPTIMIZERS[kind](), total, pct_start
    )


@pytest.mark.parametrize("pct_start", [0.2, 0.3])
def test_tensor_hyperparameters_are_filled_in_place(pct_start: float) -> None:
    """The graph-ready optimizer holds its LR and beta1 in tensors that never change identity: each
    step's value (torch's, in float32) lands in the same memory, also after a checkpoint is loaded."""
    total = 50
    cfg = TrainConfig(pct_start=pct_start)
    optimizer = build_optimizer(cfg, params(), 1.0, tensor_hparams=True)
    group = optimizer.param_groups[0]
    schedule = build_schedule(cfg, optimizer, total, 1.0)
    lr, beta1 = group["lr"], group["betas"][0]
    assert isinstance(lr, torch.Tensor) and isinstance(beta1, torch.Tensor)
    expected = torch_values(torch.optim.Adam(params(), lr=cfg.lr), total, pct_start)
    for step in range(total):
        assert group["lr"] is lr and group["betas"][0] is beta1
        assert (lr.item(), beta1.item()) == tuple(
            torch.tensor(v, dtype=torch.float32).item() for v in expected[step]
        )
        if step == 20:  # a checkpoint's round trip replaces the group's tensors with loaded copies
            optimizer.load_state_dict(optimizer.state_dict())
            schedule.load_state_dict(schedule.state_dict())
        if step < total - 1:
            schedule.step()


def test_resumes_from_its_own_and_from_torchs_state() -> None:
    """A checkpoint holds ``last_epoch``; older checkpoints hold torch's OneCycleLR state, whose
    ``last_epoch`` means the same."""
    total = 40
    reference = OneCycle(OPTIMIZERS["adam"](), total_steps=total, pct_start=0.3, **SCHEDULE)
    theirs = torch.optim.lr_scheduler.OneCycleLR(
        OPTIMIZERS["adam"](), total_steps=total, pct_start=0.3, **SCHEDULE
    )
    for _ in range(13):
        reference.step()
        theirs.step()
    for state in (reference.state_dict(), theirs.state_dict()):
        optimizer = OPTIMIZERS["adam"]()
        resumed = OneCycle(optimizer, total_steps=total, pct_start=0.3, **SCHEDULE)
        resumed.load_state_dict(state)
        assert resumed.last_epoch == 13
        assert optimizer.param_groups[0]["lr"] == reference.get_last_lr()[0] == theirs.get_last_lr()[0]


def test_stepping_past_the_schedule_is_refused() -> None:
    schedule = OneCycle(OPTIMIZERS["adam"](), total_steps=4, pct_start=0.3, **SCHEDULE)
    for _ in range(4):
        schedule.step()
    with pytest.raises(ValueError, match="stepped 5 times; the schedule has 4 steps"):
        schedule.step()
