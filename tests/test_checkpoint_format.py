"""Checkpoints in-process, on temporary folders: the format (manifest, verification, the newest valid
one, unsafe pickles), the compatibility policy, which checkpoints are kept, when the Checkpointer
saves, and a save -> load round trip into fresh objects that restores everything exactly."""

from __future__ import annotations

import json
import logging
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from mnist_dist import checkpoint_format as fmt
from mnist_dist.checkpoint import Checkpointer
from mnist_dist.compat import check_compatible
from mnist_dist.config import ConfigError, TrainConfig, from_preset
from mnist_dist.model import build_model
from mnist_dist.optim import EMA
from mnist_dist.state import Meters, TrainState

from .helpers import RunsCode

STEPS_PER_EPOCH = 4


# ---------------------------------------------------------------------- the format
def hand_made(ckpt_dir: Path, step: int) -> Path:
    """A sealed checkpoint folder holding two small files."""
    final = ckpt_dir / fmt.folder_name(step)
    tmp = fmt.tmp_folder(final)
    tmp.mkdir(parents=True)
    torch.save({"step": torch.tensor(step)}, tmp / "optimizer.bin")
    (tmp / fmt.STATE).write_text(json.dumps({"step": step}))
    return fmt.commit(tmp, final, {"global_step": step})


def test_a_sealed_folder_verifies_and_leaves_no_temporary_folder(tmp_path: Path) -> None:
    path = hand_made(tmp_path, 7)
    manifest = fmt.verify(path)
    assert manifest["format"] == fmt.FORMAT and manifest["global_step"] == 7
    assert set(manifest["files"]) == {"optimizer.bin", fmt.STATE}
    assert fmt.step_of(path) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000007"]


def test_damaged_or_unfinished_checkpoints_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    older, newest = hand_made(tmp_path, 1), hand_made(tmp_path, 2)
    weights = newest / "optimizer.bin"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    unfinished = hand_made(tmp_path, 4)
    unfinished.rename(fmt.tmp_folder(unfinished))  # as a crash mid-write leaves it
    no_manifest = hand_made(tmp_path, 3)
    (no_manifest / fmt.MANIFEST).unlink()
    assert fmt.candidates(tmp_path) == [no_manifest, newest, older]
    with caplog.at_level(logging.WARNING, logger=fmt.__name__):
        assert fmt.find_latest(tmp_path) == older
    assert f"{no_manifest} has no {fmt.MANIFEST}" in caplog.text
    assert f"{weights} is truncated or altered" in caplog.text
    (older / fmt.STATE).write_text("{}")
    assert fmt.find_latest(tmp_path) is None
    assert fmt.find_latest(tmp_path / "absent") is None


def test_a_changed_byte_or_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    path = hand_made(tmp_path, 1)
    blob = bytearray((path / "optimizer.bin").read_bytes())
    blob[-100] ^= 0xFF  # same size, one byte changed
    (path / "optimizer.bin").write_bytes(bytes(blob))
    with pytest.raises(fmt.CheckpointError, match=r"optimizer\.bin changed after it was written"):
        fmt.verify(path)
    with pytest.raises(fmt.CheckpointError, match="not a mnist-dist checkpoint"):
        fmt.verify(tmp_path)


def test_a_format_1_checkpoint_is_refused_naming_both_versions(tmp_path: Path) -> None:
    path = hand_made(tmp_path, 1)
    manifest = json.loads((path / fmt.MANIFEST).read_text())
    (path / fmt.MANIFEST).write_text(json.dumps({**manifest, "format": 1}))
    expected = rf"{path} is a format-1 checkpoint; this version of mnist-dist reads format {fmt.FORMAT} only"
    with pytest.raises(fmt.FormatError, match=expected):
        fmt.verify(path)
    with pytest.raises(fmt.FormatError):  # not skipped: --resume auto must not restart the run
        fmt.find_latest(tmp_path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the raw pickle below
def test_a_pickle_that_runs_code_is_refused_without_running(tmp_path: Path) -> None:
    sentinel = tmp_path / "code-ran"
    torch.save({"state": RunsCode(sentinel)}, tmp_path / "optimizer.bin")
    (tmp_path / "random_states_0.pkl").write_bytes(pickle.dumps({"state": RunsCode(sentinel)}))
    for name in ("optimizer.bin", "random_states_0.pkl"):
        with pytest.raises(fmt.CheckpointError, match=rf"{name} does not load without running code"):
            fmt.safe_torch_load(tmp_path / name)
    assert not sentinel.exists(), "unpickling ran code"
    assert fmt.safe_torch_load(hand_made(tmp_path, 1) / "optimizer.bin")["step"] == 1


def test_writing_step_n_removes_later_checkpoints_then_keeps_the_newest(tmp_path: Path) -> None:
    """Resumed from step 4 of a folder that reached step 8: the checkpoints of steps 6 and 8 are a
    discarded future; once step 5 is written they go, or --resume auto would jump back to step 8."""
    for step in (2, 4, 6, 8):
        hand_made(tmp_path, step)
    written = hand_made(tmp_path, 5)
    removed = fmt.prune(tmp_path, written, keep=2)
    assert sorted(fmt.step_of(p) for p in removed) == [2, 6, 8]
    assert fmt.candidates(tmp_path) == [written, tmp_path / fmt.folder_name(4)]
    assert fmt.find_latest(tmp_path) == written


# ---------------------------------------------------------------------- compatibility
def test_check_compatible_names_every_difference(tmp_path: Path) -> None:
    cfg = from_preset("default")
    plan = {"model": "Net", "params": 10, "global_batch": 256, "steps_per_epoch": 4, "world_size": 2}
    saved = {"config": cfg.to_dict(), "plan": plan}
    # Another world size with the same global batch, other speed and bookkeeping options: accepted.
    check_compatible(
        saved,
        cfg.replace(batch_size=256, compile=True, checkpoint_every=7, eval_batch_size=500, wandb="offline"),
        {**plan, "world_size": 1},
        tmp_path,
    )
    with pytest.raises(ConfigError) as refused:
        check_compatible(
            saved, cfg.replace(split_seed=1, preset="reference"), {**plan, "global_batch": 128}, tmp_path
        )
    message = str(refused.value)
    assert message.startswith(f"checkpoint {tmp_path} belongs to a different run: ")
    assert "--split-seed 0 in the checkpoint, 1 now" in message
    assert "--preset 'default' in the checkpoint, 'reference' now" in message
    assert "global batch 256 in the checkpoint, 128 now" in message


# ---------------------------------------------------------------------- the Checkpointer
class Run:
    """One single-process run's objects, as the trainer builds them (a tiny Net, Adam, OneCycleLR)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, seed: int) -> None:
        torch.manual_seed(seed)
        self.accelerator = Accelerator(cpu=True)
        self.net = build_model("net")
        self.model = self.accelerator.prepare_model(self.net)
        self.optimizer = self.accelerator.prepare_optimizer(torch.optim.Adam(self.net.parameters(), lr=0.01))
        total = STEPS_PER_EPOCH * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=0.05, total_steps=total)
        self.ema = EMA(self.net, 0.9)
        self.aug_gen = torch.Generator().manual_seed(seed)
        self.state = TrainState(Meters.zeros("cpu"))
        self.checkpointer = Checkpointer(
            self.accelerator, cfg, run_dir, net=self.net, optimizer=self.optimizer,
            scheduler=self.scheduler, ema=self.ema.module, aug_gen=self.aug_gen,
            steps_per_epoch=STEPS_PER_EPOCH,
        )  # fmt: skip

    def step(self) -> None:
        """One optimizer step on random digits drawn from this run's generator, as the loop does."""
        x = torch.rand(8, 1, 28, 28, generator=self.aug_gen)
        y = torch.randint(0, 10, (8,), generator=self.aug_gen)
        out = self.model(x)
        loss = torch.nn.functional.nll_loss(out, y, reduction="sum")
        loss.backward()
        self.state.meters.add(loss.detach(), (out.argmax(1) == y).sum(), len(y))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.global_step += 1
        self.state.step_in_epoch += 1
        self.ema.update(self.state.global_step)

    def end_epoch(self) -> None:
        self.state.history.append({"epoch": self.state.epoch + 1, "val_acc": 0.5})
        self.state.epoch, self.state.step_in_epoch = self.state.epoch + 1, 0
        self.state.meters.reset_epoch()


def config(tmp: Path, **changes: Any) -> TrainConfig:
    return from_preset("reference", output_dir=str(tmp), name="run", epochs=2, **changes)


def test_maybe_save_checkpoints_every_n_steps_and_each_epoch_but_not_twice(tmp_path: Path) -> None:
    run = Run(config(tmp_path, checkpoint_every=2, keep_checkpoints=10), tmp_path / "run", seed=1)
    reasons: dict[int, str] = {}
    for _ in range(2):
        for _ in range(STEPS_PER_EPOCH):
            run.step()
            if path := run.checkpointer.maybe_save(run.state, epoch_end=False):
                reasons[run.state.global_step] = fmt.verify(path)["reason"]
        run.end_epoch()
        path = run.checkpointer.maybe_save(run.state, epoch_end=True)
        reasons[run.state.global_step] = fmt.verify(path)["reason"]
    # Steps 4 and 8 end an epoch: one checkpoint each, the epoch's.
    assert reasons == {2: "step", 4: "epoch", 6: "step", 8: "epoch"}
    assert [fmt.step_of(p) for p in fmt.candidates(tmp_path / "run/checkpoints")] == [8, 6, 4, 2]


def test_maybe_save_without_checkpoint_every_saves_at_epoch_ends_only(tmp_path: Path) -> None:
    run = Run(config(tmp_path), tmp_path / "run", seed=1)
    run.step()
    run.step()
    assert run.checkpointer.maybe_save(run.state, epoch_end=False) is None
    assert not (tmp_path / "run/checkpoints").exists()


def snapshot(run: Run) -> dict[str, Any]:
    """Everything a resume must restore, as comparable values."""
    return {
        "net": {k: v.clone() for k, v in run.net.state_dict().items()},
        "ema": {k: v.clone() for k, v in run.ema.module.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "aug_gen": run.aug_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "state": run.state.state_dict(),
    }


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def test_save_then_load_into_fresh_objects_restores_everything_exactly(tmp_path: Path) -> None:
    cfg = config(tmp_path, deterministic=True)
    first = Run(cfg, tmp_path / "run", seed=1)
    for _ in range(STEPS_PER_EPOCH + 2):  # into the second epoch, with running sums
        first.step()
        if first.state.step_in_epoch == STEPS_PER_EPOCH:
            first.end_epoch()
    first.state.train_seconds, first.state.epoch_seconds = 1.5, 0.25
    path = first.checkpointer.save(first.state, "preempted")
    saved = snapshot(first)
    torch.rand(3), random.random(), np.random.rand()  # the streams move on after the save

    second = Run(cfg, tmp_path / "run", seed=2)
    assert second.checkpointer.resolve("auto") == path == second.checkpointer.resolve(str(path))
    second.checkpointer.load(path, second.state)
    assert_same(snapshot(second), saved)
    assert second.state.position() == first.state.position()
    # ...and the next step is the same step (dropout draws from torch's stream, as restored).
    for run in (first, second):
        torch.set_rng_state(saved["torch_rng"])
        run.step()
    assert_same(second.net.state_dict(), first.net.state_dict())
    assert_same(second.state.state_dict(), first.state.state_dict())


def test_a_new_write_at_an_earlier_step_retires_the_later_checkpoints(tmp_path: Path) -> None:
    """Defect (f) through the Checkpointer: a run resumed from step 1 of a folder that reached step 3
    writes step 2; the abandoned step 3 must not be what --resume auto picks next."""
    cfg = config(tmp_path, checkpoint_every=1, keep_checkpoints=3)
    first = Run(cfg, tmp_path / "run", seed=1)
    for _ in range(3):
        first.step()
        first.checkpointer.maybe_save(first.state, epoch_end=False)
    ckpts = tmp_path / "run/checkpoints"
    resumed = Run(cfg, tmp_path / "run", seed=2)
    resumed.checkpointer.load(ckpts / fmt.folder_name(1), resumed.state)
    resumed.step()
    written = resumed.checkpointer.maybe_save(resumed.state, epoch_end=False)
    assert written == ckpts / fmt.folder_name(2)
    assert fmt.candidates(ckpts) == [written, ckpts / fmt.folder_name(1)]
    assert resumed.checkpointer.resolve("auto") == written
