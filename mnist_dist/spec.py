"""The plain facts a run is built from: the split sizes, the model widths, the step rule and the
test-time views.

They live here, apart from ``data`` and ``model``, because the config checks and the CLI's help
need them and must not import torch: ``mnist-dist --help`` and a rejected option answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass

N_TRAIN, N_VAL = 50_000, 10_000
ELASTIC_SIGMA = 4.0  # Simard et al. (2003): sigma 4 px with alpha 34 worked best on MNIST

MODELS = {
    "net": {"width1": 8, "width2": 16},  # the reference design: 8,440 parameters
    "net_wide": {"width1": 12, "width2": 24},  # same layout, 1.5x channels: 18,708 parameters
    "net_wider": {"width1": 16, "width2": 24},  # 2x/1.5x channels: 19,616 parameters
    # net_wider's budget re-allocated (issue 18's GPU candidates): the first block wider, the rest
    # narrower; or the first block as Net's and the rest wider.
    "net_w24x23": {"width1": 24, "width2": 23},  # 19,929 parameters
    "net_w8x25": {"width1": 8, "width2": 25},  # 19,213 parameters
}


def step_bounds(n: int, step: int, world: int) -> list[int]:
    """Where each optimizer step of an epoch starts and ends in the epoch's permutation of n samples,
    in steps of ``step`` samples (the last is [bounds[-2], n)).

    A last step smaller than the world size is merged into the step before it, so every rank has at
    least one sample in every step (DDP and BatchNorm need that). The config's checks and the
    sampler both count steps with this one rule.
    """
    if n < world:
        raise ValueError(f"{n} training samples cannot be shared by {world} processes")
    bounds = [*range(0, n, step), n]
    if len(bounds) > 2 and n - bounds[-2] < world:
        bounds.pop(-2)
    return bounds


@dataclass(frozen=True)
class View:
    """One fixed test-time view of an image: a whole-pixel shift (right and down positive), then a
    rotation about the centre by ``degrees`` (the sign convention of ``data.augment``'s angles)."""

    name: str
    dx: int = 0
    dy: int = 0
    degrees: float = 0.0


# Fixed before any measurement, never chosen on the numbers: the image, shifted one pixel each way,
# and turned 5 degrees each way.
TTA_VIEWS = (
    View("identity"),
    View("shift right", dx=1),
    View("shift left", dx=-1),
    View("shift down", dy=1),
    View("shift up", dy=-1),
    View("rotate +5", degrees=5.0),
    View("rotate -5", degrees=-5.0),
)
# Everything that reports a TTA number names it by this label.
TTA_LABEL = f"TTA, {len(TTA_VIEWS)} views"
