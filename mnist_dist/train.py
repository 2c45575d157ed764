"""The training entry point: one rank's whole run, top to bottom.

    mnist-dist train [OPTIONS]                                    # CLI (launches N ranks if asked)
    python -m mnist_dist.train [OPTIONS]                          # same options, this process only
    accelerate launch --config_file accelerate_config.yaml -m mnist_dist.train [OPTIONS]
    torchrun --nproc_per_node N -m mnist_dist.train [OPTIONS]

setup → data on the device → model → prepare → (resume) → loop → evaluate → save → close.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
from accelerate.utils import tqdm as progress

from mnist_dist import checkpoint as C
from mnist_dist import data as D
from mnist_dist.config import ConfigError, TrainConfig, default_data_dir
from mnist_dist.model import build_model, count_parameters
from mnist_dist.tracking import make_tracker, wandb_log_with

EXPECTED_WORLD_ENV = "MNIST_DIST_EXPECTED_WORLD"
TRACE_ENV = "MNIST_DIST_TRACE_DIR"  # test instrumentation: per-rank indices and LRs


def default_run_name(cfg: TrainConfig) -> str:
    return f"{cfg.preset}-{datetime.now():%Y%m%d-%H%M%S}"


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """cpu=True without a GPU: otherwise gloo ranks each believe they are alone (GUIDE pitfall 4).
    wandb (when on) is started later by the main process's tracker, with dir=<run folder>."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.precision,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=True)],
        log_with=wandb_log_with(cfg),
    )


def check_world_size(accelerator: Accelerator) -> None:
    """Fail loudly when the launcher started fewer ranks than were asked for."""
    asked = int(os.environ.get(EXPECTED_WORLD_ENV) or os.environ.get("WORLD_SIZE") or 1)
    if accelerator.num_processes != asked:
        raise RuntimeError(
            f"asked for {asked} processes but this run has world size {accelerator.num_processes} "
            f"({accelerator.distributed_type}); refusing to run fewer ranks than asked"
        )
    if (
        os.environ.get("ACCELERATE_USE_CPU")
        and "WORLD_SIZE" not in os.environ
        and "MASTER_ADDR" in os.environ
    ):
        warnings.warn(
            "`accelerate launch --cpu` starts ONE process whatever --num_processes says; for N CPU "
            "ranks use `mnist-dist train --processes N` or `accelerate launch --multi_gpu`",
            stacklevel=1,
        )


def set_threads(cfg: TrainConfig, accelerator: Accelerator) -> int:
    """On CPU give each local rank an equal share of the cores (launchers set 1 thread otherwise)."""
    if accelerator.device.type != "cpu":
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(threads)
    return threads


def resolve_run_dir(cfg: TrainConfig, accelerator: Accelerator) -> Path:
    """Rank 0 picks and creates the run folder and tells the others, so all agree on one folder."""
    payload: list[Any] = [None]
    if accelerator.is_main_process:
        name = cfg.name or default_run_name(cfg)
        run_dir = Path(cfg.output_dir) / name
        try:
            if cfg.resume is None:
                run_dir.mkdir(parents=True, exist_ok=False)
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
            payload[0] = str(run_dir)
        except FileExistsError:
            payload[0] = ConfigError(
                f"run folder {run_dir} already exists; pick another --name, or --resume auto to continue it"
            )
    if accelerator.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    if isinstance(payload[0], Exception):
        raise payload[0]
    return Path(payload[0])


def sync_from_rank0(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """Copy rank 0's parameters and buffers (BatchNorm statistics) to all ranks, so evaluation
    and the saved weights are the same model whatever the world size."""
    if accelerator.num_processes == 1:
        return
    for t in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(t.data, src=0)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: D.DeviceSplit,
    accelerator: Accelerator,
    batch: int,
    want_predictions: bool = False,
) -> dict[str, Any]:
    """Exact-count evaluation: each rank takes a contiguous shard (no padding, no duplicates),
    sums are reduced over ranks, so accuracy counts every sample exactly once for any world size."""
    model.eval()
    device = accelerator.device
    idx = D.eval_shard(len(split), accelerator.num_processes, accelerator.process_index).to(device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss, count
    preds = []
    for chunk in idx.split(batch):
        x, y = D.normalize(split.images[chunk]), split.labels[chunk]
        with accelerator.autocast():
            out = model(x).float()
        pred = out.argmax(1)
        sums += torch.stack(
            [
                (pred == y).sum().double(),
                F.nll_loss(out, y, reduction="sum").double(),
                torch.tensor(len(y), device=device, dtype=torch.float64),
            ]
        )
        preds.append(pred)
    sums = accelerator.reduce(sums, reduction="sum") if accelerator.num_processes > 1 else sums
    correct, loss, count = sums.tolist()
    result: dict[str, Any] = {"acc": correct / count, "loss": loss / count, "count": int(count)}
    if want_predictions:
        local = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=device)
        width = math.ceil(len(split) / accelerator.num_processes)
        padded = torch.full((width,), -1, dtype=torch.long, device=device)
        padded[: len(local)] = local
        gathered = accelerator.gather(padded) if accelerator.num_processes > 1 else padded
        result["predictions"] = gathered[gathered >= 0].cpu()
    return result


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


def build_optimizer(cfg: TrainConfig, params: Any, lr_scale: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr * lr_scale, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(params, lr=cfg.lr * lr_scale, weight_decay=cfg.weight_decay)


def optimizer_stepper(optimizer: AcceleratedOptimizer, accelerator: Accelerator) -> torch.optim.Optimizer:
    """What the loop calls `step`/`zero_grad` on. Accelerate's wrapper runs two importlib package
    searches and a signature inspection on every step (~1 ms per step on a 2-core CPU, 1.5% of Net's
    step); without a loss scaler (fp32, bf16) it does nothing this loop needs (it uses no Accelerate
    gradient accumulation), so the loop steps torch's optimizer. fp16 keeps the wrapper's GradScaler."""
    return optimizer if accelerator.scaler is not None else optimizer.optimizer


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training on this rank; return the summary (the same dict summary.json holds)."""
    accelerator = make_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    cfg.validate(world_size=world, cuda=accelerator.device.type == "cuda")
    check_world_size(accelerator)
    threads = set_threads(cfg, accelerator)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    set_seed(cfg.seed)
    device = accelerator.device

    # --- data: every rank reads the verified .gz files; only a missing-file download is locked.
    data_root = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    with accelerator.main_process_first():
        arrays = D.load_mnist(data_root)
    splits = D.device_splits(arrays, cfg.split_seed, device, cfg.max_train_samples)
    batch = cfg.per_process_batch(world)
    sampler = D.ShardedSampler(len(splits["train"]), batch, world, rank, cfg.seed, cfg.grad_accum)
    steps_per_epoch = sampler.steps_per_epoch()
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.pct_start * total_steps == 1:  # OneCycleLR divides by zero on a one-step warm-up
        raise ConfigError(
            f"--pct-start {cfg.pct_start} of {total_steps} steps is a one-step warm-up, which "
            "OneCycleLR cannot schedule; change --pct-start, --epochs or --max-train-samples"
        )
    run_dir = resolve_run_dir(cfg, accelerator)

    # --- model, optimizer, schedule. The scheduler is NOT prepared: we step it exactly once per
    # optimizer step on every rank, sized by the true number of steps (GUIDE pitfall 1).
    net = build_model(cfg.model).to(device)
    if cfg.sync_bn and world > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    lr_scale = cfg.lr_scale(world)
    optimizer = build_optimizer(cfg, net.parameters(), lr_scale)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.max_lr * lr_scale,
        total_steps=total_steps,
        pct_start=cfg.pct_start,
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
    )
    # Compile the bare module, then let Accelerate wrap it (DDP over a compiled module: pitfall 8).
    model = accelerator.prepare_model(torch.compile(net) if cfg.compile else net)
    optimizer = accelerator.prepare_optimizer(optimizer)
    stepper = optimizer_stepper(optimizer, accelerator)
    ema = EMA(net, cfg.ema) if cfg.ema else None
    eval_net = ema.module if ema is not None else net
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000 + rank)
    torch.manual_seed(cfg.seed * 1_000 + rank)  # dropout masks differ per rank, reproducibly

    # --- resume: weights, optimizer, schedule, EMA, RNG streams, position and the epoch's running
    # sums come back exactly, so the run continues as if it had never stopped (checkpoint.py).
    checkpointer = C.Checkpointer(
        accelerator,
        cfg,
        run_dir,
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema.module if ema is not None else None,
        aug_gen=aug_gen,
        steps_per_epoch=steps_per_epoch,
    )
    resumed, resumed_meters = C.RunState(), C.new_meters(device)
    resume_from = checkpointer.resolve(cfg.resume) if cfg.resume else None
    if resume_from is not None:
        resumed, resumed_meters = checkpointer.load(resume_from)
    if cfg.resume and accelerator.is_main_process:
        C.trim_metrics(run_dir / "metrics.jsonl", resumed)

    tracker = make_tracker(accelerator, cfg, run_dir)
    trace: dict[str, Any] = {"rank": rank, "world": world, "indices": [], "lr": []}
    tracing = bool(os.environ.get(TRACE_ENV))
    params = count_parameters(net)
    tracker.print(
        f"mnist-dist: {cfg.preset} preset, {world} process(es) on {device} ({threads} threads each), "
        f"precision {cfg.precision}, {len(splits['train']):,} train samples, batch {batch}/process, "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps, run folder {run_dir}"
    )
    if resume_from is not None:
        tracker.print(f"resumed from {resume_from} (step {resumed.global_step} of {total_steps})")
    elif cfg.resume:
        tracker.print("no checkpoint to resume from yet: starting from step 0")

    history, global_step = resumed.history, resumed.global_step
    train_seconds, train_images = resumed.train_seconds, resumed.train_images

    def position(epoch: int, step: int, epoch_seconds: float) -> C.RunState:
        """The run's state for a checkpoint taken after `step` steps of `epoch`."""
        return C.RunState(epoch, step, global_step, history, train_seconds, train_images, epoch_seconds)

    wall_start = time.perf_counter()
    watch = C.PreemptionWatch(accelerator)
    bar = progress(total=total_steps, initial=global_step, desc="train", dynamic_ncols=True)
    try:
        for epoch in range(resumed.epoch, cfg.epochs):
            model.train()
            first = epoch == resumed.epoch  # a resumed epoch continues from its saved step and sums
            meters = resumed_meters if first else C.new_meters(device)
            loss_sum, correct, seen, window_loss = (
                meters[k] for k in ("loss_sum", "correct", "seen", "window_loss")
            )
            start = resumed.step_in_epoch if first else 0
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter() - (resumed.epoch_seconds if first else 0.0)
            cpu0 = time.process_time()
            for step, (micro_batches, global_n) in enumerate(sampler.epoch(epoch, start, device), start + 1):
                scale = world / global_n  # DDP averages over ranks: this makes it the global mean
                for i, idx in enumerate(micro_batches):
                    x = D.augment(
                        splits["train"].images[idx],
                        aug_gen,
                        cfg.rotate,
                        cfg.translate,
                        cfg.scale,
                        cfg.interpolation,
                        cfg.elastic,
                    )
                    y = splits["train"].labels[idx]
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    last = i == len(micro_batches) - 1
                    with accelerator.no_sync(model) if not last else nullcontext():
                        out = model(x)
                        if cfg.label_smoothing:
                            loss = F.cross_entropy(
                                out.float(), y, label_smoothing=cfg.label_smoothing, reduction="sum"
                            )
                        else:
                            loss = F.nll_loss(out.float(), y, reduction="sum")
                        accelerator.backward(loss * scale)
                    loss_sum += loss.detach()
                    window_loss += loss.detach()
                    correct += (out.detach().argmax(1) == y).sum()
                    seen += len(idx)
                    if tracing:
                        trace["indices"].append(idx.tolist())
                stepper.step()
                stepper.zero_grad(set_to_none=True)
                if tracing:
                    trace["lr"].append(optimizer.param_groups[0]["lr"])
                global_step += 1
                if global_step < total_steps:
                    scheduler.step()
                if ema is not None:
                    ema.update(global_step)
                bar.update(1)
                if global_step % cfg.log_every == 0:
                    # One host sync every log_every steps, never per step.
                    step_loss = window_loss.item() / max(1, cfg.log_every * global_n / world)
                    window_loss.zero_()
                    tracker.log_step(
                        global_step,
                        {
                            "train/loss": step_loss,
                            "lr": scheduler.get_last_lr()[0],
                            "epoch": global_step / steps_per_epoch,
                        },
                    )
                    bar.set_postfix(loss=f"{step_loss:.4f}")
                # Step boundary: stop here on SIGTERM/SIGUSR1 (all ranks agree), or checkpoint.
                end_of_epoch = step == steps_per_epoch
                if watch.should_stop(global_step, boundary=end_of_epoch):
                    here = position(epoch, step, time.perf_counter() - t0)
                    raise watch.preempted(checkpointer.save(here, meters, "preempted"), cfg)
                if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and not end_of_epoch:
                    checkpointer.save(position(epoch, step, time.perf_counter() - t0), meters, "step")
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_seconds = time.perf_counter() - t0
            epoch_cpu_seconds = time.process_time() - cpu0
            train_seconds += epoch_seconds
            counts = torch.stack(
                [
                    loss_sum.double(),
                    correct.double(),
                    seen.double(),
                ]
            )
            if world > 1:
                counts = accelerator.reduce(counts, reduction="sum")
            tl, tc, tn = counts.tolist()
            train_images += int(tn)
            sync_from_rank0(eval_net, accelerator)
            val = evaluate(eval_net, splits["val"], accelerator, cfg.eval_batch_size)
            record = {
                "epoch": epoch + 1,
                "train_loss": tl / tn,
                "train_acc": tc / tn,
                "val_loss": val["loss"],
                "val_acc": val["acc"],
                "val_count": val["count"],
                "epoch_seconds": epoch_seconds,
                "images_per_second": tn / epoch_seconds,
                # CPU seconds of this process (all threads; since the resume in a resumed epoch):
                # unlike wall time, not inflated by other work sharing the machine (mnist-dist bench).
                "epoch_cpu_seconds": epoch_cpu_seconds,
                "lr": optimizer.param_groups[0]["lr"],
            }
            history.append(record)
            tracker.log_epoch(epoch + 1, record)
            checkpointer.save(position(epoch + 1, 0, 0.0), C.new_meters(device), "epoch")
        bar.close()

        sync_from_rank0(eval_net, accelerator)
        val = evaluate(eval_net, splits["val"], accelerator, cfg.eval_batch_size, want_predictions=True)
        test = evaluate(eval_net, splits["test"], accelerator, cfg.eval_batch_size)
        best = max(history, key=lambda r: r["val_acc"])
        summary = {
            "preset": cfg.preset,
            "val_acc": val["acc"],
            "val_loss": val["loss"],
            "val_count": val["count"],
            "test_acc": test["acc"],
            "test_loss": test["loss"],
            "test_count": test["count"],
            "best_epoch": best["epoch"],
            "best_val_acc": best["val_acc"],
            "params": params,
            "epochs": cfg.epochs,
            "steps": total_steps,
            "world_size": world,
            "precision": cfg.precision,
            "device": _device_name(device),
            "threads_per_process": threads,
            "seed": cfg.seed,
            "split_seed": cfg.split_seed,
            "wall_seconds": time.perf_counter() - wall_start,
            "train_seconds": train_seconds,
            "train_images_per_second": train_images / train_seconds,
            "run_dir": str(run_dir),
            "torch": torch.__version__,
        }
        if accelerator.is_main_process:
            save_weights(eval_net, run_dir / "model.safetensors")
        tracker.finish(
            summary,
            {
                "val_predictions": val.get("predictions"),
                "val_labels": splits["val"].labels.cpu(),
                "val_images": splits["val"].images,  # the tracker copies only the misclassified ones
            },
        )
        tracker.print(
            f"done: val {100 * summary['val_acc']:.2f}%  test {100 * summary['test_acc']:.2f}%  "
            f"({summary['wall_seconds']:.1f} s, {summary['train_images_per_second']:,.0f} train img/s) → {run_dir}"
        )
        if tracing:
            Path(os.environ[TRACE_ENV]).mkdir(parents=True, exist_ok=True)
            (Path(os.environ[TRACE_ENV]) / f"rank{rank}.json").write_text(json.dumps(trace))
        accelerator.wait_for_everyone()
        return summary
    finally:
        watch.close()
        tracker.close()
        accelerator.end_training()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """Weights as safetensors (no pickle, no code on load), written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


if __name__ == "__main__":
    from mnist_dist.cli import train_entry

    train_entry()
