"""What ``mnist-dist bench`` times, and how: its options, checked, without importing torch, so the CLI
builds the bench command (and answers ``--help`` or a bad option) at once. ``bench`` does the timing."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from mnist_dist.config import ConfigError, TrainConfig, reference

# The config fields that decide a step's cost: recorded with every result, and (with the threads
# and the data) the recipe options of `mnist-dist bench`, generated from TrainConfig like train's.
STEP_FIELDS = (
    "model", "precision", "compile", "channels_last", "cuda_graph", "batch_size", "optimizer",
    "rotate", "translate", "scale", "interpolation", "elastic", "ema",
)  # fmt: skip
OPTION_FIELDS = (*STEP_FIELDS, "threads", "data_dir")
# The bare step's variants: config fields set on top of the recipe, so a new speed field of TrainConfig
# is a new variant here. The loop's "vs bare" is against the fastest of those timed.
BARE_VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {"compile": False, "channels_last": False},
    "channels_last": {"compile": False, "channels_last": True},
    "compile": {"compile": True, "channels_last": False},
    "compile+channels_last": {"compile": True, "channels_last": True},
}
PROFILE_SKIP = 10  # untraced steps before a profile (compilation, allocator and cache warm-up)


@dataclass(frozen=True)
class BenchOptions:
    """What to time: a recipe (a preset with TrainConfig options on top, as in ``train``) and how."""

    recipe: TrainConfig = field(default_factory=reference)
    max_train_samples: int = 10_240
    epochs: int = 2  # timed epochs of the loop, after one warm-up epoch
    steps: int | None = None  # timed steps of bare and conventional (default: the loop's timed steps)
    warmup_steps: int = 10
    rounds: int = 3
    workers: tuple[int, ...] = (0, 1, 2)  # conventional DataLoader worker counts, each timed
    bare: tuple[str, ...] = tuple(BARE_VARIANTS)  # bare-step variants timed
    conventional: bool = True

    def __post_init__(self) -> None:
        _listed(
            self.workers, "--workers", lambda w: isinstance(w, int) and w >= 0, "integers >= 0 like 0,1,2"
        )
        _listed(self.bare, "--bare", BARE_VARIANTS.__contains__, f"names from {', '.join(BARE_VARIANTS)}")

    def kinds(self) -> list[str]:
        """The measurements of one round, the loop first (its warm-up is then a cold start's)."""
        bare = [f"bare:{name}" for name in self.bare]
        conventional = [f"conventional:{w}_workers" for w in self.workers] if self.conventional else []
        return ["loop", *bare, *conventional]

    def train_config(self, output_dir: str, name: str) -> TrainConfig:
        """The config the loop runs with; bare and conventional read their options from it too."""
        cfg = self.recipe.replace(
            threads=self.recipe.threads or os.cpu_count() or 1,
            max_train_samples=self.max_train_samples,
            epochs=1 + self.epochs,
            output_dir=output_dir,
            name=name,
            wandb="disabled",
        )
        import torch

        return cfg.validate(world_size=1, cuda=torch.cuda.is_available())

    def record(self) -> dict[str, Any]:
        """The options as the JSON reports them: the recipe's preset and options, then bench's own."""
        own = {k: v for k, v in asdict(self).items() if k != "recipe"}
        return {"preset": self.recipe.preset, **{k: getattr(self.recipe, k) for k in OPTION_FIELDS}, **own}


def _listed(values: tuple[Any, ...], flag: str, ok: Callable[[Any], bool], allowed: str) -> None:
    if not values or len(set(values)) != len(values) or not all(ok(v) for v in values):
        shown = ",".join(map(str, values))
        raise ConfigError(f"{flag} must list {allowed}, each once; got {shown!r}")


def parse_list(text: str, flag: str, kind: type = str) -> tuple[Any, ...]:
    """A comma-separated option's values (``--workers 0,1,2``), refused by name if one is not a ``kind``."""
    try:
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated {kind.__name__}s; got {text!r}") from None
