"""One rank's training run, in phases a reader can follow:

    Trainer(cfg)        setup: accelerator, data on the device, model, optimizer, schedule, resume, tracker
    train_step(...)     one optimizer step: forward/backward over its micro-batches, optimizer, schedule, EMA
    train_epoch(e)      the epoch's steps, with logging, preemption and step checkpoints at step boundaries
    end_epoch(e, ...)   reduce the epoch's sums over ranks, evaluate, log, checkpoint
    finish()            final evaluation, model.safetensors, summary and pictures

``train(cfg)`` runs them and always cleans up. A loss or weight that turns NaN or inf stops every
rank at the next log boundary or checkpoint, whichever comes first, before anything is saved from it
(``faults.Diverged``). Every counter and meter lives on ``self.state``
(``mnist_dist.state.TrainState``), which the checkpointer saves and restores. Tests hook in from
outside through ``Hooks`` instead of branches inside the loop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from accelerate.utils import tqdm as progress

from mnist_dist import data as D
from mnist_dist import distributed as dist
from mnist_dist import faults, runfiles, spec
from mnist_dist.branches import branched, fold
from mnist_dist.checkpoint import Checkpointer
from mnist_dist.config import ConfigError, TrainConfig, default_data_dir, run_dir_taken
from mnist_dist.distill import Teachers
from mnist_dist.evaluate import evaluate_split
from mnist_dist.model import build_model, compiled, count_parameters
from mnist_dist.optim import EMA, build_optimizer, build_schedule, optimizer_stepper
from mnist_dist.preemption import PreemptionWatch
from mnist_dist.state import Meters, TrainState
from mnist_dist.tracking import make_tracker, wandb_log_with
from mnist_dist.weights import save_weights


class Hooks:
    """Points where code outside the loop may look in (tests record indices and learning rates)."""

    def on_step(self, trainer: Trainer, micro_batches: list[torch.Tensor]) -> None:
        """Before each optimizer step: its micro-batches; the optimizer holds the step's LR."""

    def on_finish(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """After the run's summary is written."""


def default_run_name(cfg: TrainConfig) -> str:
    return f"{cfg.preset}-{datetime.now():%Y%m%d-%H%M%S}"


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """On the device ``distributed.use_cpu`` picks. wandb (when on) is started later by the main
    process's tracker, with dir=<run folder>."""
    dist.init_process_group()
    return Accelerator(
        cpu=dist.use_cpu(cfg.cpu),
        mixed_precision=cfg.precision,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=True)],
        log_with=wandb_log_with(cfg),
    )


class Trainer:
    def __init__(
        self, cfg: TrainConfig, *, data: D.MNISTArrays | None = None, hooks: Sequence[Hooks] = ()
    ) -> None:
        self.cfg, self.hooks = cfg, list(hooks)
        self.accelerator = acc = make_accelerator(cfg)
        self.world, self.rank, self.device = acc.num_processes, acc.process_index, acc.device
        self.speed = cfg.speed(self.device.type)
        cfg.validate(world_size=self.world, cuda=self.device.type == "cuda")
        dist.check_world_size(acc)
        self.threads = dist.set_threads(cfg.threads, acc)
        dist.set_determinism(cfg.deterministic, self.device)
        # Before the seed: building the teachers' modules draws from torch's generator.
        self.teachers = Teachers.load(cfg, self.device)
        set_seed(cfg.seed)
        self.splits = self._device_data(data)
        self.batch_size = cfg.per_process_batch(self.world)
        self.sampler = D.ShardedSampler(
            len(self.splits["train"]), self.batch_size, self.world, self.rank, cfg.seed, cfg.grad_accum
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch()
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.run_dir = dist.agree(acc, self._create_run_dir)
        self._build_model()
        self.state = TrainState(Meters.zeros(self.device))
        self.checkpointer = Checkpointer(
            acc, cfg, self.run_dir, net=self.net, optimizer=self.optimizer, scheduler=self.scheduler,
            ema=self.ema.module if self.ema else None, aug_gen=self.aug_gen,
            steps_per_epoch=self.steps_per_epoch, before_save=self.check_finite,
        )  # fmt: skip
        self.resumed_from = self._resume()
        self.checked_step = self.state.global_step  # the last step known finite (a checkpoint's were)
        self.tracker = make_tracker(acc, cfg, self.run_dir)
        self._announce()

    # ------------------------------------------------------------------ setup
    def _device_data(self, data: D.MNISTArrays | None) -> dict[str, D.DeviceSplit]:
        """Every rank reads the verified .gz files; only a missing-file download is serialised."""
        if data is None:
            with self.accelerator.main_process_first():
                data = D.load_mnist(Path(self.cfg.data_dir) if self.cfg.data_dir else default_data_dir())
        return D.device_splits(data, self.cfg.split_seed, self.device, self.cfg.max_train_samples)

    def _create_run_dir(self) -> Path:
        """Rank 0 creates the run folder (never reusing one unless resuming); every rank gets its path."""
        run_dir = Path(self.cfg.output_dir) / (self.cfg.name or default_run_name(self.cfg))
        try:
            run_dir.mkdir(parents=True, exist_ok=self.cfg.resume is not None)
        except FileExistsError:
            raise run_dir_taken(run_dir) from None
        except OSError as e:
            raise ConfigError(f"cannot create the run folder {run_dir}: {e.strerror}") from None
        return run_dir

    def _build_model(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        net = build_model(cfg.model)
        net = (branched(net) if cfg.branches else net).to(self.device)
        if cfg.sync_bn and self.world > 1:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        if self.speed.channels_last:
            net = net.to(memory_format=torch.channels_last)
        lr_scale = cfg.lr_scale(self.world)
        optimizer = build_optimizer(cfg, net.parameters(), lr_scale, tensor_hparams=self.speed.compile)
        self.scheduler = build_schedule(cfg, optimizer, self.total_steps, lr_scale)
        # Compile the bare module, then let Accelerate wrap it: Dynamo tracing DDP's internals fails.
        self.model = acc.prepare_model(compiled(net, self.speed.cuda_graph) if self.speed.compile else net)
        self.optimizer = acc.prepare_optimizer(optimizer)
        self.stepper = optimizer_stepper(self.optimizer, acc)
        self.net = net
        self.ema = EMA(net, cfg.ema) if cfg.ema else None
        self.eval_net = self.ema.module if self.ema else net
        seed = dist.rank_seed(cfg.seed, self.rank)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(seed)
        torch.manual_seed(seed)  # dropout masks differ per rank, reproducibly

    def _resume(self) -> Path | None:
        """Weights, optimizer, schedule, EMA, random streams and the state come back exactly."""
        path = self.checkpointer.resolve(self.cfg.resume) if self.cfg.resume else None
        if path is not None:
            self.checkpointer.load(path, self.state)
        if self.cfg.resume and self.accelerator.is_main_process:
            runfiles.trim_metrics(self.run_dir, self.state.global_step, self.state.epoch)
        return path

    def _announce(self) -> None:
        cfg, say = self.cfg, self.tracker.print
        say(
            f"mnist-dist: {cfg.preset} preset, {self.world} process(es) on {self.device} ({self.threads} "
            f"threads each), precision {cfg.precision}, compile {self.speed.compile}, channels_last "
            f"{self.speed.channels_last}, CUDA graphs {self.speed.cuda_graph}, {len(self.splits['train']):,} train samples, batch "
            f"{self.batch_size}/process, {self.steps_per_epoch} steps/epoch, {self.total_steps} steps, "
            f"run folder {self.run_dir}"
        )
        if self.teachers is not None:
            say(self.teachers.describe())
        if self.resumed_from is not None:
            say(f"resumed from {self.resumed_from} (step {self.state.global_step} of {self.total_steps})")
        elif cfg.resume:
            say("no checkpoint to resume from yet: starting from step 0")

    # ------------------------------------------------------------------ one step
    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch of augmented, normalised training images and their labels."""
        cfg, train = self.cfg, self.splits["train"]
        x = D.augment(
            train.images[idx],
            self.aug_gen,
            cfg.rotate,
            cfg.translate,
            cfg.scale,
            cfg.interpolation,
            cfg.elastic,
        )
        if self.speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, train.labels[idx]

    def loss(self, out: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The summed loss of a micro-batch (scaled to the global mean by the step); with teachers,
        mixed with the soft loss against their view of the same images ``x``."""
        if self.cfg.label_smoothing:
            hard = F.cross_entropy(out, y, label_smoothing=self.cfg.label_smoothing, reduction="sum")
        else:
            hard = F.nll_loss(out, y, reduction="sum")
        return hard if self.teachers is None else self.teachers.loss(hard, out, x)

    def train_step(self, micro_batches: list[torch.Tensor], global_n: int) -> None:
        """One optimizer step over this rank's micro-batches of a global batch of ``global_n`` samples.
        No host synchronisation: the meters are device tensors, the step counters host integers."""
        scale = self.world / global_n  # DDP averages over ranks: this makes it the global mean
        if self.speed.cuda_graph:  # a new step: the graphs may reuse the last step's output memory
            torch.compiler.cudagraph_mark_step_begin()
        last = len(micro_batches) - 1
        for i, idx in enumerate(micro_batches):
            x, y = self.batch(idx)
            with self.accelerator.no_sync(self.model) if i < last else nullcontext():
                out = self.model(x)
                loss = self.loss(out.float(), y, x)
                self.accelerator.backward(loss * scale)
            self.state.meters.add(loss.detach(), (out.detach().argmax(1) == y).sum(), len(idx))
        self.stepper.step()
        self.stepper.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self.state.step_in_epoch += 1
        if self.state.global_step < self.total_steps:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.state.global_step)

    # ------------------------------------------------------------------ epochs
    def fit(self) -> None:
        """The epochs still to run, under the preemption watch (stopped before the final evaluation)."""
        self.started = time.perf_counter()
        self.watch = PreemptionWatch(self.accelerator)
        self.bar = progress(
            total=self.total_steps, initial=self.state.global_step, desc="train", dynamic_ncols=True
        )
        try:
            for epoch in range(self.state.epoch, self.cfg.epochs):
                self.end_epoch(epoch, *self.train_epoch(epoch))
        finally:
            self.bar.close()
            self.watch.close()

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """The epoch's remaining steps; returns its wall and CPU seconds (a resumed epoch's wall time
        includes what it had spent before the stop)."""
        state, cfg = self.state, self.cfg
        self.model.train()
        self._synchronize()
        t0, cpu0 = time.perf_counter() - state.epoch_seconds, time.process_time()
        for micro_batches, global_n in self.sampler.epoch(epoch, state.step_in_epoch, self.device):
            for hook in self.hooks:
                hook.on_step(self, micro_batches)
            self.train_step(micro_batches, global_n)
            self.bar.update(1)
            if state.global_step % cfg.log_every == 0:
                self.log_window()
            state.epoch_seconds = time.perf_counter() - t0
            epoch_end = state.step_in_epoch == self.steps_per_epoch
            if self.watch.should_stop(state.global_step, boundary=epoch_end):
                raise self.watch.preempted(self.checkpointer.save(state, "preempted"), cfg)
            self.checkpointer.maybe_save(state, epoch_end=False)
        self._synchronize()
        return time.perf_counter() - t0, time.process_time() - cpu0

    def log_window(self) -> None:
        """The mean train loss of this rank's samples since the last log, after checking that no rank's
        loss or weights diverged: one host sync per log."""
        meters = self.state.meters
        window = torch.stack([meters.window_loss.double(), meters.window_seen.double()])
        loss, seen, *diverged = torch.cat([window, self.nonfinite()]).tolist()
        self.stop_if_diverged(diverged)
        meters.reset_window()
        step = self.state.global_step
        metrics = {"train/loss": loss / seen, "lr": self.scheduler.get_last_lr()[0]}
        self.tracker.log_step(step, {**metrics, "epoch": step / self.steps_per_epoch})
        self.bar.set_postfix(loss=f"{loss / seen:.4f}")

    def end_epoch(self, epoch: int, seconds: float, cpu_seconds: float) -> None:
        """Reduce the epoch's train sums over ranks, evaluate, log, and checkpoint."""
        self.check_finite()
        state, meters = self.state, self.state.meters
        counts = torch.stack([meters.loss_sum.double(), meters.correct.double(), meters.seen.double()])
        if self.world > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        loss_sum, correct, seen = counts.tolist()
        val = self.evaluate("val")
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "val_count": val["count"],
            "epoch_seconds": seconds,
            "images_per_second": seen / seconds,
            # CPU seconds of this process (all threads; since the resume in a resumed epoch): unlike
            # wall time, not inflated by other work sharing the machine.
            "epoch_cpu_seconds": cpu_seconds,
            "lr": self.scheduler.get_last_lr()[0],
        }
        state.history.append(record)
        state.train_seconds += seconds
        state.train_images += int(seen)
        self.tracker.log_epoch(epoch + 1, record)
        state.epoch, state.step_in_epoch, state.epoch_seconds = epoch + 1, 0, 0.0
        meters.reset_epoch()
        self.checkpointer.maybe_save(state, epoch_end=True)

    # ------------------------------------------------------------------ divergence
    def nonfinite(self) -> torch.Tensor:
        """Two flags, the train loss since the last log and the weights: 1.0 where some rank holds a
        NaN or an inf. Device work outside ``train_step``; collective when world > 1."""
        weights = torch.stack([torch.isfinite(p.detach()).all() for p in self.net.parameters()]).all()
        flags = torch.stack([torch.isfinite(self.state.meters.window_loss), weights]).logical_not().double()
        if self.world > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return flags

    def stop_if_diverged(self, flags: list[float]) -> None:
        """Raise Diverged (on every rank: the flags are reduced) if the loss or the weights went
        non-finite since the last check; otherwise the steps so far are checked."""
        step, first = self.state.global_step, self.checked_step + 1
        if not any(flags):
            self.checked_step = step
            return
        latest = self.checkpointer.latest
        kept = f"newest checkpoint: {latest}" if latest else "no checkpoint was written"
        epoch, lr = (step - 1) // self.steps_per_epoch + 1, self.scheduler.get_last_lr()[0]
        raise faults.Diverged(
            f"the {'train loss' if flags[0] else 'weights'} became NaN or inf in steps {first}-{step} "
            f"(epoch {epoch}, lr {lr:.3g}); every rank stopped and nothing after step {first - 1} was "
            f"saved ({kept}): lower --max-lr or --lr (exit code {faults.DIVERGED_EXIT})"
        )

    def check_finite(self) -> None:
        """Before an epoch's record and before every checkpoint: diverged weights are never saved."""
        self.stop_if_diverged(self.nonfinite().tolist())

    def evaluate(
        self, split: str, want_predictions: bool = False, views: Sequence[spec.View] | None = None
    ) -> dict[str, Any]:
        """The evaluated weights (EMA or live), the same on every rank, on a whole split."""
        dist.sync_from_rank0(self.eval_net, self.accelerator)
        return evaluate_split(
            self.eval_net,
            self.splits[split],
            self.accelerator,
            self.cfg.eval_batch_size,
            want_predictions,
            views,
        )

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict[str, Any]:
        """Final evaluation on validation and test (with --tta also under test-time augmentation), the
        weights, the summary and the pictures."""
        if self.cfg.branches:  # from here on: the plain model the branches fold into
            self.eval_net = fold(self.eval_net)
        val = self.evaluate("val", want_predictions=True)
        test = self.evaluate("test")
        tta = {s: self.evaluate(s, views=spec.TTA_VIEWS) for s in ("val", "test")} if self.cfg.tta else {}
        summary = self.summary(val, test, tta)
        artifacts = {
            "val_predictions": val.get("predictions"),
            "val_labels": self.splits["val"].labels.cpu(),
            "val_images": self.splits["val"].images,  # the tracker copies only the misclassified ones
        }
        dist.agree(self.accelerator, lambda: self._write_final(summary, artifacts))
        tta_text = "".join(f"{s} ({spec.TTA_LABEL}) {100 * summary[f'{s}_tta_acc']:.2f}%  " for s in tta)
        self.tracker.print(
            f"done: val {100 * summary['val_acc']:.2f}%  test {100 * summary['test_acc']:.2f}%  {tta_text}"
            f"({summary['wall_seconds']:.1f} s, {summary['train_images_per_second']:,.0f} train img/s) "
            f"→ {self.run_dir}"
        )
        for hook in self.hooks:
            hook.on_finish(self, summary)
        self.accelerator.wait_for_everyone()
        return summary

    def _write_final(self, summary: dict[str, Any], artifacts: dict[str, Any]) -> None:
        """Main process: the weights, then summary.json and the pictures. A failed write stops every
        rank (through ``agree``) with WriteFailed; the last checkpoint holds the finished training."""
        then = (
            f"the last checkpoint, {self.checkpointer.latest}, is intact: fix that, then run the same "
            "command with --resume auto to write the final files"
        )
        weights = self.run_dir / runfiles.WEIGHTS_FILE
        with faults.writing(weights, then):
            save_weights(self.eval_net, weights)
        with faults.writing(self.run_dir, then):
            self.tracker.finish(summary, artifacts)

    def summary(
        self, val: dict[str, Any], test: dict[str, Any], tta: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """What summary.json holds; ``tta`` (split -> its TTA evaluation) adds ``<split>_tta_acc`` and
        ``<split>_tta_loss``."""
        cfg, state = self.cfg, self.state
        best = max(state.history, key=lambda r: r["val_acc"])
        return {
            "preset": cfg.preset,
            **{f"val_{k}": val[k] for k in ("acc", "loss", "count")},
            **{f"test_{k}": test[k] for k in ("acc", "loss", "count")},
            **{f"{s}_tta_{k}": r[k] for s, r in tta.items() for k in ("acc", "loss")},
            "best_epoch": best["epoch"],
            "best_val_acc": best["val_acc"],
            "params": count_parameters(self.eval_net),
            "train_params": count_parameters(self.net),
            "branches": cfg.branches,
            "epochs": cfg.epochs,
            "steps": self.total_steps,
            "world_size": self.world,
            "precision": cfg.precision,
            **dataclasses.asdict(self.speed),
            "device": dist.device_name(self.device),
            "threads_per_process": self.threads,
            "seed": cfg.seed,
            "split_seed": cfg.split_seed,
            "wall_seconds": time.perf_counter() - self.started,
            "train_seconds": state.train_seconds,
            "train_images_per_second": state.train_images / state.train_seconds,
            "run_dir": str(self.run_dir),
            "torch": torch.__version__,
            **(self.teachers.summary() if self.teachers is not None else {}),
        }

    def close(self) -> None:
        self.tracker.close()
        self.accelerator.end_training()

    def _synchronize(self) -> None:
        """Epoch timings must cover the queued GPU work too."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def train(
    cfg: TrainConfig, *, data: D.MNISTArrays | None = None, hooks: Sequence[Hooks] = ()
) -> dict[str, Any]:
    """Run one training on this rank; return the summary (the same dict summary.json holds).
    ``data``: the arrays to train on instead of reading the MNIST files (the CLI's one-process run
    passes the files it has just verified; tests pass small synthetic digits)."""
    trainer = Trainer(cfg, data=data, hooks=hooks)
    try:
        trainer.fit()
        return trainer.finish()
    finally:
        trainer.close()
