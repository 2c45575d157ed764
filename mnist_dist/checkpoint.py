"""The Checkpointer: when a run saves, what it saves, and an exact resume.

    mnist-dist train --checkpoint-every 500 --keep-checkpoints 3 ...   # write them
    mnist-dist train --name <run> --resume auto ...                     # continue the run (or start it)
    mnist-dist train --resume runs/<run>/checkpoints/step-00001234 ...  # continue from that one

The loop only reports where it is (``maybe_save`` after each step and each epoch); the intervals are
decided here. The folder layout, the manifest (written last, with the sha256 of every file) and the
verification are ``mnist_dist.checkpoint_format``; which checkpoints a run may resume from is
``mnist_dist.compat``.

Loading does not go through ``accelerator.load_state``, for three reasons read in accelerate 1.15's
``checkpointing.py``: objects given to ``register_for_checkpointing`` are unpickled with
``weights_only=False`` (a checkpoint could run code); a random-state file that fails to load is skipped
with an info log (a resume would silently diverge); and the model's keys carry DDP's ``module.``
prefix or not depending on the world size, so a strict load fails across world sizes. Here every
file is safetensors, JSON or ``torch.load(weights_only=True)``, and any failure is an error.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from mnist_dist import checkpoint_format as fmt
from mnist_dist.compat import check_compatible, run_plan
from mnist_dist.config import TrainConfig
from mnist_dist.distributed import agree, restart_seed
from mnist_dist.faults import WriteFailed, raise_first, writing
from mnist_dist.files import fsync_paths, write_json_atomic
from mnist_dist.optim import OneCycle
from mnist_dist.state import TrainState
from mnist_dist.weights import WeightsError, load_state_dict

_AUG_GEN, _METER = "aug_gen", "meter."  # keys of a rank's own file


class Checkpointer:
    """Writes and restores one run's checkpoints. Every method is called on every rank.

    ``before_save`` runs (on every rank) before each checkpoint is written and may raise to prevent
    it: the trainer refuses to save weights that have diverged.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        cfg: TrainConfig,
        run_dir: Path,
        *,
        net: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: OneCycle,
        ema: torch.nn.Module | None,
        aug_gen: torch.Generator,
        steps_per_epoch: int,
        before_save: Callable[[], None] = lambda: None,
    ) -> None:
        self.accelerator, self.cfg, self.dir = accelerator, cfg, Path(run_dir) / "checkpoints"
        self.net, self.optimizer, self.scheduler = net, optimizer, scheduler
        self.ema, self.aug_gen, self.steps_per_epoch = ema, aug_gen, steps_per_epoch
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.plan = run_plan(cfg, net, self.world, steps_per_epoch)
        self.before_save = before_save
        self._saved: tuple[int, Path] | None = None
        self.latest: Path | None = None  # the newest checkpoint saved or loaded by this process

    # ------------------------------------------------------------------ save
    def maybe_save(self, state: TrainState, *, epoch_end: bool) -> Path | None:
        """After an epoch (``epoch_end``, the state already at the next epoch's start) or after an
        optimizer step (every --checkpoint-every steps, except the epoch's last: its epoch checkpoint
        follows). Collective: call it on every rank at the same points."""
        if epoch_end:
            return self.save(state, "epoch")
        every = self.cfg.checkpoint_every
        if every and state.global_step % every == 0 and state.step_in_epoch < self.steps_per_epoch:
            return self.save(state, "step")
        return None

    def save(self, state: TrainState, reason: str) -> Path:
        """Write a checkpoint of the current step (collective; once per step); return its folder.
        A write that fails on any rank stops every rank with WriteFailed: the folder being filled is
        removed, and the newest complete checkpoint stays the one ``--resume auto`` picks."""
        if self._saved and self._saved[0] == state.global_step:
            return self._saved[1]
        self.before_save()
        final = self.dir / fmt.folder_name(state.global_step)
        tmp, acc, then = fmt.tmp_folder(final), self.accelerator, self._then(final)
        agree(acc, lambda: self._fresh_folder(tmp, then))
        fault = None
        try:
            self._write_own(tmp, state, then)
        except WriteFailed as e:  # raised below on every rank, once all have written
            fault = e
        try:
            raise_first(acc, fault)
            path = agree(acc, lambda: self._commit(tmp, final, state, reason, then))
        except Exception:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._saved = (state.global_step, path)
        self.latest = path
        return path

    def _then(self, final: Path) -> str:
        """What a failed write leaves behind, and how to continue."""
        if self.latest is None:
            return f"{final.name} was not written and the run has no earlier checkpoint: fix that, rerun"
        return (
            f"{final.name} was not written; {self.latest} is intact: fix that, then run the same command "
            "with --resume auto to continue from it"
        )

    def _fresh_folder(self, tmp: Path, then: str) -> None:
        """Main process: an empty folder to fill (an interrupted attempt's leftovers go)."""
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(tmp, then):
            tmp.mkdir(parents=True)

    def _write_own(self, tmp: Path, state: TrainState, then: str) -> None:
        """This rank's files: accelerate's (model and optimizer from the main process, each rank's
        random states) and the rank's augmentation generator and meters."""
        with writing(tmp, then):
            self.accelerator.save_state(str(tmp))
        own = tmp / f"rank_{self.rank}.safetensors"
        tensors = {_AUG_GEN: self.aug_gen.get_state()}
        tensors.update({_METER + k: v for k, v in state.state_dict()["meters"].items()})
        with writing(own, then):
            save_file(tensors, str(own))
            fsync_paths(own, tmp / f"random_states_{self.rank}.pkl")

    def _commit(self, tmp: Path, final: Path, state: TrainState, reason: str, then: str) -> Path:
        """Main process: add the run's own state, seal the folder, prune the older ones."""
        with writing(tmp, then):
            self._write_run_state(tmp, state)
            fmt.commit(
                tmp,
                final,
                {
                    "reason": reason,
                    "global_step": state.global_step,
                    "epoch": state.epoch,
                    "step_in_epoch": state.step_in_epoch,
                    "best_val_acc": state.best_val_acc,
                    "world_size": self.world,
                },
            )
        fmt.prune(self.dir, final, self.cfg.keep_checkpoints)
        return final

    def _write_run_state(self, tmp: Path, state: TrainState) -> None:
        missing = [r for r in range(self.world) if not (tmp / f"rank_{r}.safetensors").is_file()]
        if missing:
            raise fmt.CheckpointError(
                f"ranks {missing} wrote their state elsewhere: --output-dir must be on a filesystem "
                "shared by all nodes"
            )
        if self.ema is not None:
            ema_state = {k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()}
            save_file(ema_state, str(tmp / "ema.safetensors"))
        run_state = {
            "config": self.cfg.to_dict(),
            "plan": self.plan,
            "state": state.state_dict()["position"],
            "scheduler": self.scheduler.state_dict(),
            "torch": torch.__version__,
        }
        write_json_atomic(tmp / fmt.STATE, run_state)

    # ------------------------------------------------------------------ resume
    def resolve(self, spec: str) -> Path | None:
        """Rank 0 picks the checkpoint for --resume ('auto': newest valid one, None if there is none)
        and verifies it; every rank gets the same answer."""

        def pick() -> Path | None:
            if spec == "auto":
                return fmt.find_latest(self.dir)
            fmt.verify(Path(spec))
            return Path(spec)

        return agree(self.accelerator, pick)

    def load(self, path: Path, state: TrainState) -> None:
        """Restore everything saved at ``path`` into this rank's objects and ``state`` (in place)."""
        saved = fmt.read_json(path / fmt.STATE)
        check_compatible(saved, self.cfg, self.plan, path)
        self.net.load_state_dict(_weights(path / "model.safetensors"))
        self.optimizer.load_state_dict(fmt.safe_torch_load(path / "optimizer.bin"))
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(fmt.safe_torch_load(path / "scaler.pt"))
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(_weights(path / "ema.safetensors"))
        position = saved["state"]
        if saved["plan"]["world_size"] == self.world:
            _restore_rng(fmt.safe_torch_load(path / f"random_states_{self.rank}.pkl"))
            own = fmt.load_tensors(path / f"rank_{self.rank}.safetensors")
            self.aug_gen.set_state(own[_AUG_GEN])
            meters = _meters(own)
        else:
            old_world, template = saved["plan"]["world_size"], state.state_dict()["meters"]
            meters = self._restart_streams(path, old_world, position["global_step"], template)
        state.load_state_dict({"position": position, "meters": meters})
        self.latest = path

    def _restart_streams(
        self, path: Path, old_world: int, step: int, template: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """On another world size the saved per-rank streams do not apply: each rank's start afresh,
        seeded by (seed, rank, step), and rank 0 carries the old ranks' summed meters, so the epoch's
        train metrics stay exact. Returns this rank's meters."""
        seed = restart_seed(self.cfg.seed, self.rank, step)
        torch.manual_seed(seed)
        self.aug_gen.manual_seed(seed)
        totals = {k: torch.zeros_like(v) for k, v in template.items()}
        if self.accelerator.is_main_process:
            for r in range(old_world):
                old = _meters(fmt.load_tensors(path / f"rank_{r}.safetensors"))
                for k, v in totals.items():
                    v += old[k]
        return totals


def _meters(own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(_METER): v for k, v in own.items() if k.startswith(_METER)}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_state_dict(path)
    except WeightsError as e:
        raise fmt.CheckpointError(str(e)) from None


def _restore_rng(states: dict[str, Any]) -> None:
    """The RNG states accelerate's save_state wrote for this rank (dropout draws from torch's)."""
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if "torch_cuda_manual_seed" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
