"""``mnist-dist bench``: how fast the training loop runs, against its ceiling and the conventional pipeline.

    mnist-dist bench [--preset reference] [--precision bf16] [--workers 0,1,2] [--profile 20] [--json bench.json]

Measurements of the same model (same optimizer, batch and precision), taken in one process and
interleaved round by round, so a machine whose speed drifts moves all of them alike:

- loop: the real ``mnist_dist.trainer.train`` on a slice of the training split, in a temporary run folder.
  Its first epoch is warm-up (and compilation); images/s come from the later epochs' own timings
  (``metrics.jsonl``), which leave out evaluation.
- bare: forward, backward and optimizer step over batches gathered and augmented in advance on the
  device — no sampling, augmentation, scheduler or bookkeeping. The ceiling the loop is held against,
  timed in each variant of ``BARE_VARIANTS`` (eager, channels_last, torch.compile, both); the loop's
  ratio is to the fastest.
- conventional: torchvision's MNIST dataset, a DataLoader, PIL ``RandomRotation((-7, 7), fill=(0,))``,
  ``ToTensor`` and ``Normalize``, feeding the loop's model step; timed with each DataLoader worker count
  asked for (workers compete with the training threads for the cores), the fastest is the baseline.

On a GPU every interval is measured with CUDA events around the queued work (the loop's epochs are
bracketed by ``torch.cuda.synchronize`` in the trainer). Warm-up is timed and reported apart.
``ProfileSteps`` traces steps of the real loop with ``torch.profiler`` (``--profile`` of bench and train).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mnist_dist import data as D
from mnist_dist import spec
from mnist_dist.bench_options import BARE_VARIANTS, PROFILE_SKIP, STEP_FIELDS, BenchOptions
from mnist_dist.config import TrainConfig, default_data_dir
from mnist_dist.files import write_text_atomic
from mnist_dist.model import build_model, compiled
from mnist_dist.trainer import Hooks, Trainer, train

Step = Callable[[torch.Tensor, torch.Tensor], None]
Chunk = tuple[float, float | None, int]  # wall seconds, CPU seconds (None: not known), images
Rounds = dict[str, list[dict[str, Any]]]  # measurement -> one result per round
GROUPS = ("bare", "conventional")  # measured in variants; each group's fastest is the one compared


# ---------------------------------------------------------------------- timing
def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Wall seconds fn takes (on a GPU the span of its queued work, by CUDA events) and the CPU
    seconds this process spent meanwhile (all threads)."""
    cpu0 = time.process_time()
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, time.process_time() - cpu0
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000, time.process_time() - cpu0


def model_step(cfg: TrainConfig, device: torch.device) -> Step:
    """A fresh model's forward/backward/optimizer step with the loop's optimizer, precision and options."""
    from mnist_dist.optim import build_optimizer

    net = build_model(cfg.model).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = compiled(net, cfg.cuda_graph) if cfg.compile else net
    model.train()
    optimizer = build_optimizer(cfg, net.parameters(), 1.0, tensor_hparams=bool(cfg.compile))  # as the loop's
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if cfg.compile and cfg.cuda_graph:  # as the loop's train_step
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype, enabled=cfg.precision != "no"):
            out = model(x)
        loss = F.nll_loss(out.float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------------- the three measurements
def summarize(chunks: list[Chunk], warmup_seconds: float, **extra: Any) -> dict[str, Any]:
    """Totals of (wall seconds, CPU seconds, images) chunks of about an epoch each, and the best chunk.

    On a machine shared with other work, wall time stretches whenever this process waits for a core;
    the fastest chunk is the least disturbed one, and CPU seconds (where known) do not count waiting.
    """
    seconds, images = sum(c[0] for c in chunks), sum(c[2] for c in chunks)
    cpu = None if any(c[1] is None for c in chunks) else sum(c[1] or 0.0 for c in chunks)
    rates = [n / s for s, _, n in chunks]
    return {
        "images_per_second": images / seconds,
        "best_images_per_second": max(rates),
        "images_per_cpu_second": images / cpu if cpu else None,
        "chunk_images_per_second": rates,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "images": images,
        "warmup_seconds": warmup_seconds,
        **extra,
    }


def bench_bare(cfg: TrainConfig, split: D.DeviceSplit, steps: int, chunk: int, warmup: int) -> dict[str, Any]:
    """The ceiling: the model step alone over one epoch's batches, gathered and augmented beforehand."""
    device = split.images.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    batches = []
    for idx in order.split(cfg.batch_size):
        x = D.augment(
            split.images[idx], gen, cfg.rotate, cfg.translate, cfg.scale, cfg.interpolation, cfg.elastic
        )
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x, split.labels[idx]))
    step = model_step(cfg, device)
    # Warm-up sees every batch shape the timed steps will (a short last batch compiles apart).
    warm = batches[:warmup] + batches[-1:]

    def run(plan: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
        def go() -> None:
            for x, y in plan:
                step(x, y)

        return go

    warmup_seconds, _ = timed(run(warm), device)
    plan = [batches[i % len(batches)] for i in range(steps)]
    chunks = [plan[i : i + chunk] for i in range(0, steps, chunk)]
    return summarize([(*timed(run(c), device), sum(len(y) for _, y in c)) for c in chunks], warmup_seconds)


def quiet_train(cfg: TrainConfig, hooks: list[Hooks] | None = None) -> dict[str, Any]:
    """``train`` with its output held back (shown only if it fails), so bench prints its own lines."""
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return train(cfg, hooks=hooks or [])
    except BaseException:
        sys.stderr.write(log.getvalue())
        raise


def bench_loop(opts: BenchOptions, out_dir: Path, name: str) -> dict[str, Any]:
    """The real training loop: ``train`` itself on the slice; epoch 1 is warm-up, the rest are timed."""
    from mnist_dist.runfiles import read_metrics

    summary = quiet_train(opts.train_config(str(out_dir), name))
    epochs = [r for r in read_metrics(Path(summary["run_dir"])) if r.get("kind") == "epoch"]
    chunks = [
        (r["epoch_seconds"], r["epoch_cpu_seconds"], round(r["images_per_second"] * r["epoch_seconds"]))
        for r in epochs
    ]
    steady = statistics.median(c[0] for c in chunks[1:])
    # Warm-up: what the first epoch costs beyond a steady one (start-up, autotuning, compilation).
    return summarize(chunks[1:], max(0.0, chunks[0][0] - steady), val_acc=summary["val_acc"])


class ProfileSteps(Hooks):
    """Traces ``steps`` optimizer steps of the real loop with ``torch.profiler``, after PROFILE_SKIP
    untraced ones, into ``<run>/profile/loop.pt.trace.json``: a Chrome trace (Perfetto,
    chrome://tracing) that TensorBoard's profiler plugin reads from the run folder too.

    ``on_step`` comes before each step, so it closes the previous step's span (``profiler.step()``);
    the last traced step is closed by the next step's call, or by ``on_finish`` in a run that ends
    first (whose last span then includes the final evaluation)."""

    def __init__(self, steps: int) -> None:
        self.steps, self.first = steps, PROFILE_SKIP + 1
        self.profiler: torch.profiler.profile | None = None
        self.path: Path | None = None  # set once the trace is written

    @staticmethod
    def steps_needed(steps: int) -> int:
        """Steps a run must have for ``steps`` traced ones, closed at a step boundary."""
        return PROFILE_SKIP + steps + 1

    def on_step(self, trainer: Trainer, micro_batches: list[torch.Tensor]) -> None:
        if self.profiler is not None:
            self.profiler.step()
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if trainer.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        else:  # Kineto's failed GPU probe would print an alarming but meaningless error line
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        target = trainer.run_dir / "profile" / "loop.pt.trace.json"

        def write(prof: torch.profiler.profile) -> None:
            if trainer.accelerator.is_main_process:
                target.parent.mkdir(exist_ok=True)
                prof.export_chrome_trace(str(target))
                self.path = target

        # Profiler step k spans optimizer step k + 1: wait covers the skipped steps but the last,
        # which is the profiler's own warm-up.
        when = torch.profiler.schedule(wait=PROFILE_SKIP - 1, warmup=1, active=self.steps, repeat=1)
        self.profiler = torch.profiler.profile(activities=activities, schedule=when, on_trace_ready=write)
        self.profiler.start()

    def on_finish(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self.profiler is not None and self.path is None:
            self.profiler.stop()

    def traced(self) -> str:
        """Which steps the trace holds, for the line that names the file."""
        return f"optimizer steps {self.first}-{self.first + self.steps - 1}"


def profile_loop(opts: BenchOptions, steps: int, out: Path) -> Path:
    """``steps`` steps of the loop bench times (same recipe and slice, enough epochs), traced apart
    from the timed rounds (the profiler slows what it watches); the trace is copied to ``out``."""
    with tempfile.TemporaryDirectory(prefix="mnist-dist-profile-") as tmp:
        cfg = opts.train_config(tmp, "profile")
        epochs = -(-ProfileSteps.steps_needed(steps) // cfg.steps_per_epoch(1))
        hook = ProfileSteps(steps)
        quiet_train(cfg.replace(epochs=max(cfg.epochs, epochs)), [hook])
        if hook.path is None:
            raise RuntimeError("the profiler wrote no trace")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(hook.path, out)
    return out


@contextlib.contextmanager
def torchvision_root(data_root: Path) -> Iterator[Path]:
    """A writable root for torchvision's MNIST: links to the verified .gz files, which it extracts
    beside the links — never into the user's (possibly read-only) data directory."""
    with tempfile.TemporaryDirectory(prefix="mnist-dist-tv-") as tmp:
        raw = D.raw_dir(Path(tmp))
        raw.mkdir(parents=True)
        for name in D.missing_files(Path(tmp)):
            (raw / name).symlink_to((D.raw_dir(data_root) / name).resolve())
        yield Path(tmp)


def bench_conventional(
    cfg: TrainConfig, root: Path, device: torch.device, steps: int, chunk: int, warmup: int, workers: int
) -> dict[str, Any]:
    """The baseline: per-sample PIL augmentation in DataLoader workers, batches copied to the device."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.RandomRotation((-7.0, 7.0), fill=(0,)),
            transforms.ToTensor(),
            transforms.Normalize((D.MEAN,), (D.STD,)),
        ]
    )
    with contextlib.redirect_stdout(io.StringIO()):  # torchvision announces its extraction
        dataset = datasets.MNIST(str(root), train=True, download=True, transform=transform)
    train_idx, _ = D.split_indices(cfg.split_seed)
    loader = DataLoader(
        Subset(dataset, train_idx[: cfg.max_train_samples].tolist()),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    step = model_step(cfg, device)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from loader

    stream = batches()
    counted: list[int] = []  # images of each run, warm-up first

    def run(n: int) -> Callable[[], None]:
        def go() -> None:
            images = 0
            for _ in range(n):
                x, y = next(stream)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                step(x, y)
                images += len(y)
            counted.append(images)

        return go

    warmup_seconds, _ = timed(run(warmup), device)  # includes starting the workers
    seconds = [timed(run(min(chunk, steps - i)), device)[0] for i in range(0, steps, chunk)]
    # Its workers' CPU time is not this process's: no CPU-time figure for this pipeline.
    return summarize([(s, None, n) for s, n in zip(seconds, counted[1:], strict=True)], warmup_seconds)


# ---------------------------------------------------------------------- the whole benchmark
def run_bench(opts: BenchOptions, command: str | None = None) -> dict[str, Any]:
    """Time loop, bare step and conventional pipeline in interleaved rounds; return every number."""
    from mnist_dist.distributed import device_name, local_device

    device = local_device()
    with tempfile.TemporaryDirectory(prefix="mnist-dist-bench-") as tmp:
        cfg = opts.train_config(tmp, "check")
        data_root = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
        split = D.device_splits(D.load_mnist(data_root), cfg.split_seed, device, cfg.max_train_samples)[
            "train"
        ]
        # The loop's own speed settings (a preset may leave them to the device's measured best): the
        # conventional pipeline steps the same way, the bare variants change them.
        cfg = cfg.replace(**asdict(cfg.speed(device.type)))
        steps_per_epoch = -(-len(split) // cfg.batch_size)
        steps = opts.steps or opts.epochs * steps_per_epoch
        with torchvision_root(data_root) as tv_root:

            def measure(kind: str, r: int) -> dict[str, Any]:
                torch._dynamo.reset()  # each compiled measurement compiles afresh, under the same limits
                if kind == "loop":
                    return bench_loop(opts, Path(tmp), f"loop-{r}")
                torch.set_num_threads(cfg.threads or 1)  # what the trainer sets for itself
                group, variant = kind.split(":")
                if group == "bare":
                    variant_cfg = cfg.replace(**BARE_VARIANTS[variant])
                    return bench_bare(variant_cfg, split, steps, steps_per_epoch, opts.warmup_steps)
                workers = int(variant.removesuffix("_workers"))
                return bench_conventional(
                    cfg, tv_root, device, steps, steps_per_epoch, opts.warmup_steps, workers
                )

            rounds = _interleaved(opts, measure)
    return {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "accelerate": _version("accelerate"),
        "python": platform.python_version(),
        "options": {**opts.record(), "steps": steps},
        "config": {k: getattr(cfg, k) for k in ("preset", *STEP_FIELDS)},
        "bare_variants": {name: BARE_VARIANTS[name] for name in opts.bare},
        "threads": cfg.threads,
        "train_samples": len(split),
        "steps_per_epoch": steps_per_epoch,
        **_results(rounds, device, opts.recipe),
    }


def _interleaved(opts: BenchOptions, measure: Callable[[str, int], dict[str, Any]]) -> Rounds:
    """Every measurement once per round, the loop first, so its warm-up is a cold start's
    (compilation included) and a machine whose speed drifts moves all of them alike."""
    rounds: Rounds = {k: [] for k in opts.kinds()}
    for r in range(opts.rounds):
        for kind in rounds:
            rounds[kind].append(res := measure(kind, r))
            print(
                f"round {r + 1}/{opts.rounds} {kind}: {res['images_per_second']:,.0f} img/s "
                f"(warm-up {res['warmup_seconds']:.2f} s)",
                file=sys.stderr,
                flush=True,
            )
    return rounds


def _results(rounds: Rounds, device: torch.device, recipe: TrainConfig) -> dict[str, Any]:
    """Medians over rounds, each group's fastest variant, the loop's ratios to every other
    measurement, and the recipe's projected time."""
    results = {
        kind: {
            "images_per_second": statistics.median(r["images_per_second"] for r in rs),
            "best_images_per_second": max(r["best_images_per_second"] for r in rs),
            "warmup_seconds": statistics.median(r["warmup_seconds"] for r in rs),
            "rounds": rs,
        }
        for kind, rs in rounds.items()
    }
    best = {
        group: max(kinds, key=lambda k: results[k]["images_per_second"])
        for group in GROUPS
        if (kinds := [k for k in results if k.startswith(f"{group}:")])
    }
    ratios = {kind: _ratio(rounds, kind, results, device) for kind in results if kind != "loop"}
    images = recipe.epochs * spec.N_TRAIN
    seconds = {
        kind: images / res["images_per_second"] + (res["warmup_seconds"] if kind == "loop" else 0)
        for kind, res in results.items()
    }
    # The recipe's training time at the measured rates (the loop's plus its warm-up).
    recipe_record = {"preset": recipe.preset, "epochs": recipe.epochs, "images": images, "seconds": seconds}
    return {"results": results, "best": best, "ratios": ratios, "recipe": recipe_record}


def _ratio(rounds: Rounds, base: str, results: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The loop's images/s over ``base``'s: per round (each loop round paired with the base's round
    timed next to it), their median, best epoch over best epoch, and on the CPU the same per
    CPU-second (blind to time spent waiting for a core) where both are known."""
    pairs = list(zip(rounds["loop"], rounds[base], strict=True))
    paired = [lp["images_per_second"] / b["images_per_second"] for lp, b in pairs]
    ratio: dict[str, Any] = {
        "median": statistics.median(paired),
        "rounds": paired,
        "best_epochs": results["loop"]["best_images_per_second"] / results[base]["best_images_per_second"],
    }
    if device.type == "cpu" and all(b["images_per_cpu_second"] for _, b in pairs):
        cpu = [lp["images_per_cpu_second"] / b["images_per_cpu_second"] for lp, b in pairs]
        ratio |= {"cpu_time": statistics.median(cpu), "cpu_time_rounds": cpu}
    return ratio


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _name(kind: str) -> str:
    group, _, variant = kind.partition(":")
    if group == "loop":
        return "mnist-dist training loop"
    return f"bare step: {variant}" if group == "bare" else f"conventional: {variant.replace('_', ' ')}"


def format_table(result: dict[str, Any]) -> str:
    """The human-readable report: one row per measurement (* marks each group's fastest), then the
    loop's ratios to the fastest of each group and to the eager bare step, and the recipe's projection."""
    c, res, recipe, best = result["config"], result["results"], result["recipe"], result["best"]
    opts = f"precision {c['precision']}, compile {c['compile']}, channels_last {c['channels_last']}"
    rounds = result["options"]["rounds"]
    lines = [
        f"mnist-dist bench on {result['device']}, torch {result['torch']}, {result['threads']} thread(s)",
        f"{c['preset']} preset, batch {c['batch_size']}, {opts}; {result['train_samples']:,} train samples, "
        f"{rounds} round(s): medians, and the best epoch",
        "",
        f"{'':<40}{'images/s':>10}{'best':>9}{'s/epoch':>9}{'warm-up s':>11}{'vs bare':>9}"
        f"{recipe['epochs']:>4} epochs",
    ]
    bare = res[best["bare"]]["images_per_second"] if "bare" in best else None
    for kind, r in res.items():
        ips, mark = r["images_per_second"], " *" if kind in best.values() else ""
        vs = f"{ips / bare:>9.2f}" if bare else f"{'':>9}"
        lines.append(
            f"{_name(kind) + mark:<40}{ips:>10,.0f}{r['best_images_per_second']:>9,.0f}{spec.N_TRAIN / ips:>9.2f}"
            f"{r['warmup_seconds']:>11.2f}{vs}{recipe['seconds'][kind]:>10.1f} s"
        )
    lines.append("")
    compared = [(f"fastest {_name(k)}", k) for k in best.values()]
    if "bare:eager" in res and best.get("bare") != "bare:eager":
        compared.insert(1, ("bare step: eager", "bare:eager"))
    for label, kind in compared:
        ratio = result["ratios"][kind]
        lines.append(
            f"loop / {label}: {ratio['median']:.3f} median of rounds ({_listing(ratio['rounds'])}); "
            f"best epoch / best epoch {ratio['best_epochs']:.3f}"
            + (f"; per CPU-second {ratio['cpu_time']:.3f}" if "cpu_time" in ratio else "")
        )
    lines.append(
        f"s/epoch: one epoch of the {spec.N_TRAIN:,}-image split; {recipe['epochs']} epochs: the {recipe['preset']} "
        "recipe's training time (the loop's warm-up included); vs bare: over the fastest bare step"
    )
    return "\n".join(lines)


def _listing(values: list[float]) -> str:
    return ", ".join(f"{x:.3f}" for x in values)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
