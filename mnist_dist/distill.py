"""Knowledge distillation: a student learns from an ensemble of saved runs as well as from the labels.

    mnist-dist train --distill-from runs/a,runs/b [--distill-temperature 4] [--distill-weight 0.5]

A teacher is a finished run (its folder, or the model.safetensors inside it) of any model the harness
trains. Its config.json must show the student's --split-seed: a teacher of another split has trained
on images of this run's validation split, and its advice would leak them. A teacher trained on the
first N images of that split (--max-train-samples) saw only training images, so it may teach. Its
summary.json gives its training cost, which the student's summary adds up.

The teachers run in eval mode on the run's device, never compiled nor wrapped by DDP, on the same
augmented batch the student sees, and the student's summed loss becomes
``(1 - w) * hard + w * T^2 * KL(p_teacher || p_student)`` with both distributions softened by T.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mnist_dist import runfiles
from mnist_dist.config import ConfigError, TrainConfig
from mnist_dist.model import Net, count_parameters
from mnist_dist.weights import WeightsError, load_model

FLAG = "--distill-from"


@dataclass(frozen=True)
class Teacher:
    path: str  # as given: the config carries it, and a resume loads it again
    net: Net
    model: str
    train_seconds: float


def soft_loss(student_out: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) summed over the samples, the student softened by T. T^2 keeps the
    soft gradients' size independent of T (Hinton et al., 2015)."""
    log_student = F.log_softmax(student_out / temperature, dim=1)
    return temperature**2 * F.kl_div(log_student, teacher_probs, reduction="sum")


class Teachers:
    """The ensemble: fixed inputs of the student's loss, loaded (and checked) by every rank."""

    def __init__(self, teachers: list[Teacher], temperature: float, weight: float) -> None:
        self.teachers, self.temperature, self.weight = teachers, temperature, weight

    @classmethod
    def load(cls, cfg: TrainConfig, device: torch.device) -> Teachers | None:
        """The run's teachers on ``device`` in eval mode; None without --distill-from. Every rule a
        teacher must meet is refused here by name (ConfigError), before the run folder exists."""
        if cfg.distill_from is None:
            return None
        paths = cfg.distill_from.split(",")
        if not all(paths):
            raise ConfigError(
                f"{FLAG} {cfg.distill_from!r} has an empty entry: give comma-separated run folders"
            )
        teachers = [load_teacher(path, cfg.split_seed) for path in paths]
        _refuse_repeats(paths)  # each path is readable now
        for t in teachers:
            t.net.to(device).eval()
        return cls(teachers, cfg.distill_temperature, cfg.distill_weight)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """p_teacher_T: the teachers' mean softened distribution of the images ``x``."""
        with torch.no_grad():
            # The models output log_softmax, which is shift-invariant: softmax(log_p / T) = softmax(logits / T).
            probs = [F.softmax(t.net(x).float() / self.temperature, dim=1) for t in self.teachers]
            return torch.stack(probs).mean(0)

    def loss(self, hard: torch.Tensor, student_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The student's summed loss on the images ``x``: the label loss ``hard`` mixed with the soft one."""
        soft = soft_loss(student_out, self.probs(x), self.temperature)
        return (1 - self.weight) * hard + self.weight * soft

    def describe(self) -> str:
        """The start line's account of the teachers."""
        each = ", ".join(f"{t.path} ({t.model})" for t in self.teachers)
        return (
            f"distilling from {len(self.teachers)} teacher(s): {each}; temperature {self.temperature:g}, "
            f"weight {self.weight:g}"
        )

    def summary(self) -> dict[str, Any]:
        """What the student's summary adds: the teachers and what they cost."""
        return {
            "distill_from": [t.path for t in self.teachers],
            "teacher_train_seconds": sum(t.train_seconds for t in self.teachers),
            "teacher_params": sum(count_parameters(t.net) for t in self.teachers),
        }


def load_teacher(path: str, split_seed: int) -> Teacher:
    """One teacher's model, refused by name unless its run shows it never trained on the validation
    split of ``split_seed`` and it finished."""
    try:
        net, model = load_model(Path(path))
        run = _run_folder(Path(path))
        config = runfiles.read_config(run) if run is not None else None
        summary = runfiles.read_summary(run) if config is not None else None
    except (WeightsError, runfiles.RunFilesError) as e:
        raise ConfigError(
            f"{FLAG} {path!r}: {e} (a teacher is a run folder or its {runfiles.WEIGHTS_FILE})"
        ) from None
    except OSError as e:  # a path the OS cannot look up (a name too long)
        raise ConfigError(f"{FLAG} {path!r} cannot be read: {e.strerror}") from None
    if config is None:
        raise ConfigError(
            f"{FLAG} {path!r} has no {runfiles.CONFIG_FILE} of its run, so nothing shows which split it "
            "trained on (a teacher of another split has seen validation images): give its run folder"
        )
    seed = config.get("split_seed")
    if type(seed) is not int or seed != split_seed:
        raise ConfigError(
            f"{FLAG} {path!r} trained on the split of split seed {seed!r}, which puts some of this run's "
            f"validation images (--split-seed {split_seed}) in training: give teachers of split seed {split_seed}"
        )
    seconds = (summary or {}).get("train_seconds")
    if type(seconds) not in (int, float):
        raise ConfigError(
            f"{FLAG} {path!r}: its run has no {runfiles.SUMMARY_FILE} with train_seconds (it has not "
            "finished): give finished runs"
        )
    return Teacher(path, net, model, float(seconds))


def _refuse_repeats(paths: list[str]) -> None:
    """A run named twice (as given, or once as its folder and once as its weights) would count as
    two teachers: its advice weighed double and its cost added twice."""
    seen: dict[Path, str] = {}
    for path in paths:
        weights = (Path(path) / runfiles.WEIGHTS_FILE if Path(path).is_dir() else Path(path)).resolve()
        if weights in seen:
            raise ConfigError(
                f"{FLAG} names one teacher twice, as {seen[weights]!r} and {path!r}: give each run once"
            )
        seen[weights] = path


def _run_folder(path: Path) -> Path | None:
    """The folder of the run that wrote the weights at ``path``: the folder itself, or the one holding
    its model.safetensors; None for a bare weights file elsewhere."""
    if path.is_dir():
        return path
    return path.parent if path.name == runfiles.WEIGHTS_FILE else None
