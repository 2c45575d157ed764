"""Checkpoints (atomic, verified, loaded without running code), exact resume, and preemption.

    mnist-dist train --checkpoint-every 500 --keep-checkpoints 3 ...   # write them
    mnist-dist train --name <run> --resume auto ...                     # continue the run (or start it)
    mnist-dist train --resume runs/<run>/checkpoints/step-00001234 ...  # continue from that one

One checkpoint is a folder ``<run>/checkpoints/step-<global step>``:

    model.safetensors, optimizer.bin, random_states_<rank>.pkl   accelerator.save_state (+ scaler.pt, fp16)
    ema.safetensors          the EMA weights, when --ema > 0
    rank_<rank>.safetensors  per rank: the augmentation generator and the epoch's running sums
    trainer_state.json       config, position (epoch, step), history, OneCycleLR state
    checkpoint.json          manifest: size and sha256 of every file above; written last

It is written into ``.tmp-step-N``, fsynced, and renamed into place, and only a folder whose manifest
matches every file counts: a crash mid-write never leaves a checkpoint that looks valid.

Loading does not go through ``accelerator.load_state``, for three reasons read in accelerate 1.15's
``checkpointing.py``: objects given to ``register_for_checkpointing`` are unpickled with
``weights_only=False`` (a checkpoint could run code); a random-state file that fails to load is skipped
with an info log (a resume would silently diverge); and the model's keys carry DDP's ``module.``
prefix or not depending on the world size, so a strict load fails across world sizes. Here every
file is safetensors, JSON or ``torch.load(weights_only=True)``, and any failure is an error.

Preemption: SIGTERM or SIGUSR1 only sets a flag; the ranks agree through an all-reduce on the step
to stop at, write a checkpoint together, and exit with ``PREEMPTED_EXIT``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from accelerate.utils import load as torch_load_weights_only
from safetensors.torch import load_file, save_file

from mnist_dist.config import ConfigError, TrainConfig
from mnist_dist.evaluate import WeightsError, load_state_dict

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): stopped on purpose; run the same command to continue
LAUNCH_DIR_ENV = "MNIST_DIST_LAUNCH_DIR"  # set by mnist_dist.launch: worker pids and the preempted marker
GPU_CHECK_EVERY = 10  # on a GPU, reading the stop flag is a host sync: agree only every N steps
FORMAT = 1
MANIFEST, STATE = "checkpoint.json", "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")

# Config fields a resume may change: where and how the run executes, not what it computes. The global
# batch (samples per optimizer step) must stay: world size, --batch-size and --grad-accum may change
# only together so that it does. Every other field must match (a field added later is protected too).
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
        "threads",
        "deterministic",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "resume",
        "requeue",
    }
)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or unsafe; the message names the file."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint; exit with PREEMPTED_EXIT."""

    def __init__(self, checkpoint: Path, signum: int) -> None:
        super().__init__(
            f"stopped by {signal.Signals(signum).name}: checkpoint {checkpoint}; run the same command "
            f"with --resume auto to continue (exit code {PREEMPTED_EXIT})"
        )
        self.checkpoint = checkpoint


@dataclass
class RunState:
    """Where the run is. Saved in trainer_state.json and restored on resume."""

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


def new_meters(device: torch.device) -> dict[str, torch.Tensor]:
    """One rank's running sums over the epoch in progress (saved per rank, so a resumed epoch's
    train loss and accuracy count every sample exactly once)."""
    return {
        "loss_sum": torch.zeros((), device=device),
        "correct": torch.zeros((), device=device, dtype=torch.long),
        "seen": torch.zeros((), device=device, dtype=torch.long),
        "window_loss": torch.zeros((), device=device),
    }


def global_batch(cfg: TrainConfig, world: int) -> int:
    return cfg.per_process_batch(world) * world * cfg.grad_accum


# ---------------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(*paths: Path) -> None:
    """Flush files (or folders: their entries) to the disk, so a rename never exposes lost data."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None


def step_of(path: Path) -> int | None:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def verify(path: Path) -> dict[str, Any]:
    """The manifest of a complete, unmodified checkpoint; CheckpointError for anything else."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(
            f"{path} has no {MANIFEST}: not a mnist-dist checkpoint, or its writing was interrupted"
        )
    manifest = _read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path / MANIFEST} is not a format-{FORMAT} mnist-dist manifest")
    for name, meta in manifest["files"].items():
        file = path / name
        if "/" in name or name.startswith(".") or not file.is_file():
            raise CheckpointError(f"{path}: file {name!r} listed in the manifest is missing")
        if file.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{file} is truncated or altered: {file.stat().st_size:,} bytes, manifest says {meta['bytes']:,}"
            )
        if _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file} changed after it was written (sha256 differs from the manifest)")
    return manifest


def candidates(ckpt_dir: Path) -> list[Path]:
    """The checkpoint folders of a run, newest (highest step) first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [p for p in Path(ckpt_dir).iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0, reverse=True)


def find_latest(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; newer ones that do not are skipped with a warning."""
    for path in candidates(ckpt_dir):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
    return None


def safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True (plus accelerate's numpy allowances for RNG states)."""
    try:
        return torch_load_weights_only(path, map_location="cpu")
    except Exception as e:
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
        raise CheckpointError(
            f"{path} does not load without running code, or is corrupt (weights_only=True refused it: "
            f"{reason.strip()})"
        ) from None


def _safe_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_state_dict(path)
    except WeightsError as e:
        raise CheckpointError(str(e)) from None


# ---------------------------------------------------------------------- compatibility
def check_compatible(saved: dict[str, Any], cfg: TrainConfig, plan: dict[str, Any], source: Path) -> None:
    """Refuse a checkpoint whose run computes something else; the message names every difference."""
    old = TrainConfig.from_dict(saved["config"])
    diffs = [
        f"--{f.name.replace('_', '-')} {getattr(old, f.name)!r} in the checkpoint, {getattr(cfg, f.name)!r} now"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in MAY_CHANGE
        and not f.name.startswith("wandb")
        and getattr(old, f.name) != getattr(cfg, f.name)
    ]
    for key, value in plan.items():
        if key != "world_size" and saved["plan"].get(key) != value:
            diffs.append(
                f"{key.replace('_', ' ')} {saved['plan'].get(key)!r} in the checkpoint, {value!r} now"
            )
    if diffs:
        raise ConfigError(
            f"checkpoint {source} belongs to a different run: " + "; ".join(diffs) + ". A resume may change "
            "the number of processes/nodes, --batch-size and --grad-accum (keeping the global batch, e.g. "
            "with --global-batch-size), and where and how fast it runs; nothing that changes the result."
        )


# ---------------------------------------------------------------------- save / load
class Checkpointer:
    """Writes and restores one run's checkpoints. Every method is called on every rank."""

    def __init__(
        self,
        accelerator: Accelerator,
        cfg: TrainConfig,
        run_dir: Path,
        *,
        net: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        ema: torch.nn.Module | None,
        aug_gen: torch.Generator,
        steps_per_epoch: int,
    ) -> None:
        self.accelerator, self.cfg, self.dir = accelerator, cfg, Path(run_dir) / "checkpoints"
        self.net, self.optimizer, self.scheduler = net, optimizer, scheduler
        self.ema, self.aug_gen = ema, aug_gen
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.plan = {
            "model": type(net).__name__,
            "params": sum(p.numel() for p in net.parameters()),
            "global_batch": global_batch(cfg, self.world),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": steps_per_epoch * cfg.epochs,
            "world_size": self.world,
        }
        self._saved: tuple[int, Path] | None = None

    def _agree(self, value: Any) -> Any:
        """Rank 0's value (or exception) on every rank; raise it everywhere if it is an exception."""
        payload = [value]
        if self.world > 1:
            broadcast_object_list(payload, from_process=0)
        if isinstance(payload[0], Exception):
            raise payload[0]
        return payload[0]

    # ------------------------------------------------------------------ save
    def save(self, state: RunState, meters: dict[str, torch.Tensor], reason: str) -> Path:
        """Write a checkpoint of the current step (collective); return its folder."""
        if self._saved and self._saved[0] == state.global_step:
            return self._saved[1]
        final = self.dir / f"step-{state.global_step:08d}"
        tmp = self.dir / f".tmp-{final.name}"
        acc = self.accelerator
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # model, optimizer (main process); random_states_<rank>.pkl (every rank)
        own = tmp / f"rank_{self.rank}.safetensors"
        tensors = {"aug_gen": self.aug_gen.get_state()}
        tensors.update({f"meter.{k}": v.detach().cpu() for k, v in meters.items()})
        save_file(tensors, str(own))
        _fsync(own, tmp / f"random_states_{self.rank}.pkl")
        acc.wait_for_everyone()
        result: str | Exception | None = None
        if acc.is_main_process:
            try:
                result = str(self._commit(tmp, final, state, reason))
            except Exception as e:
                result = CheckpointError(f"could not write checkpoint {final}: {e}")
        path = Path(self._agree(result))
        self._saved = (state.global_step, path)
        return path

    def _commit(self, tmp: Path, final: Path, state: RunState, reason: str) -> Path:
        """Main process: add the run's own state and the manifest, then rename into place."""
        missing = [r for r in range(self.world) if not (tmp / f"rank_{r}.safetensors").is_file()]
        if missing:
            raise CheckpointError(
                f"ranks {missing} wrote their state elsewhere: --output-dir must be on a filesystem "
                "shared by all nodes"
            )
        if self.ema is not None:
            ema_state = {k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()}
            save_file(ema_state, str(tmp / "ema.safetensors"))
        _write_json(
            tmp / STATE,
            {
                "format": FORMAT,
                "config": self.cfg.to_dict(),
                "plan": self.plan,
                "state": dataclasses.asdict(state),
                "scheduler": self.scheduler.state_dict(),
                "torch": torch.__version__,
            },
        )
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        _fsync(*files)
        manifest = {
            "format": FORMAT,
            "reason": reason,
            "global_step": state.global_step,
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "best_val_acc": state.best_val_acc,
            "world_size": self.world,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        }
        _write_json(tmp / MANIFEST, manifest)
        _fsync(tmp / MANIFEST, tmp)
        if final.exists():  # an older attempt at this step (e.g. a corrupt one that a resume skipped)
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(self.dir)
        for old in candidates(self.dir)[self.cfg.keep_checkpoints :]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # ------------------------------------------------------------------ resume
    def resolve(self, spec: str) -> Path | None:
        """Rank 0 picks the checkpoint for --resume ('auto': newest valid one, None if there is none)
        and verifies it; every rank gets the same answer."""
        found: Any = None
        if self.accelerator.is_main_process:
            try:
                if spec == "auto":
                    found = find_latest(self.dir)
                else:
                    verify(Path(spec))
                    found = Path(spec)
                found = str(found) if found is not None else None
            except CheckpointError as e:
                found = e
        found = self._agree(found)
        return Path(found) if found is not None else None

    def load(self, path: Path) -> tuple[RunState, dict[str, torch.Tensor]]:
        """Restore everything saved at `path` into this rank's objects; return the position and sums."""
        saved = _read_json(path / STATE)
        check_compatible(saved, self.cfg, self.plan, path)
        self.net.load_state_dict(_safe_state_dict(path / "model.safetensors"))
        self.optimizer.load_state_dict(safe_torch_load(path / "optimizer.bin"))
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(safe_torch_load(path / "scaler.pt"))
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(_safe_state_dict(path / "ema.safetensors"))
        state = RunState(**saved["state"])
        device = self.accelerator.device
        meters = new_meters(device)
        if saved["plan"]["world_size"] == self.world:
            _restore_rng(safe_torch_load(path / f"random_states_{self.rank}.pkl"))
            own = _load_tensors(path / f"rank_{self.rank}.safetensors")
            self.aug_gen.set_state(own["aug_gen"])
            for k, v in meters.items():
                v.copy_(own[f"meter.{k}"])
        else:
            # Another world size: each rank's random streams start afresh (seeded by rank and step), and
            # rank 0 carries the old ranks' summed counts, so the epoch's train metrics stay exact.
            seed = (self.cfg.seed * 1_000 + self.rank) * 1_000_003 + state.global_step
            torch.manual_seed(seed)
            self.aug_gen.manual_seed(seed)
            if self.accelerator.is_main_process:
                for r in range(saved["plan"]["world_size"]):
                    old = _load_tensors(path / f"rank_{r}.safetensors")
                    for k, v in meters.items():
                        v += old[f"meter.{k}"].to(device)
        return state, meters


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _restore_rng(states: dict[str, Any]) -> None:
    """The RNG states accelerate's save_state wrote for this rank (dropout draws from torch's)."""
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if "torch_cuda_manual_seed" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])


def trim_metrics(path: Path, state: RunState) -> None:
    """Drop metrics.jsonl records past the resumed position: steps a killed run logged after its last
    checkpoint are trained again, and would otherwise appear twice."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # blank, or the torn last line of a killed run
            continue
        if record.get("kind") == "step" and record["step"] > state.global_step:
            continue
        if record.get("kind") == "epoch" and record["epoch"] > state.epoch:
            continue
        kept.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


# ---------------------------------------------------------------------- preemption
class PreemptionWatch:
    """SIGTERM/SIGUSR1 request a stop at the next step boundary; all ranks agree on which one.

    The handler only records the signal. Ranks agree by an all-reduce (MAX) of the flag, on every step
    on a CPU and every GPU_CHECK_EVERY steps (and at each epoch's last step) on a GPU, where reading
    the result waits for the queued kernels. Under ``mnist-dist train`` each worker also registers
    its pid, so the launching process forwards signals to the workers themselves.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.signal: int | None = None
        self.every = 1 if accelerator.device.type == "cpu" else GPU_CHECK_EVERY
        # Python lets only the main thread install handlers; train() called from another thread
        # (a test, a notebook) keeps running without preemption handling.
        in_main = threading.current_thread() is threading.main_thread()
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS if in_main}
        launch_dir = os.environ.get(LAUNCH_DIR_ENV)
        self._pid_file = Path(launch_dir) / f"pid-{accelerator.process_index}" if launch_dir else None
        if self._pid_file is not None:
            self._pid_file.write_text(str(os.getpid()))

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def should_stop(self, step: int, boundary: bool = False) -> bool:
        """Collective when world > 1: call it on every rank after the same steps."""
        if self.accelerator.num_processes == 1:
            return self.signal is not None
        if step % self.every and not boundary:
            return False
        flag = torch.tensor(float(self.signal is not None), device=self.accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.signal is None:
            self.signal = signal.SIGTERM  # another rank got it
        return bool(flag.item())

    def preempted(self, checkpoint: Path, cfg: TrainConfig) -> Preempted:
        """After the checkpoint: tell the launcher, ask SLURM to requeue; return the exception to raise."""
        launch_dir = os.environ.get(LAUNCH_DIR_ENV)
        if launch_dir and self.accelerator.is_local_main_process:
            (Path(launch_dir) / "preempted").write_text(str(checkpoint))
        stop = Preempted(checkpoint, self.signal or signal.SIGTERM)
        if self.accelerator.is_main_process:
            if cfg.requeue:
                self.accelerator.print(requeue_slurm_job())
            self.accelerator.print(f"mnist-dist: {stop}")
        return stop

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._pid_file is not None:
            self._pid_file.unlink(missing_ok=True)


def requeue_slurm_job() -> str:
    """`scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue and reruns the same script."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "mnist-dist: --requeue: not running under SLURM (no SLURM_JOB_ID); nothing to requeue"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"mnist-dist: scontrol requeue {job} failed: {e}"
    if done.returncode:
        return f"mnist-dist: scontrol requeue {job} failed ({done.returncode}): {done.stderr.strip()}"
    return f"mnist-dist: requeued SLURM job {job}"


def worker_pids(launch_dir: Path) -> list[int]:
    """The pids the workers of a launch registered (see PreemptionWatch)."""
    return [int(p.read_text()) for p in Path(launch_dir).glob("pid-*") if p.read_text().strip()]


def was_preempted(launch_dir: Path) -> bool:
    """Whether the workers of a launch stopped on a signal after writing a checkpoint."""
    return (Path(launch_dir) / "preempted").is_file()
