"""The ``mnist-dist`` command line: thin commands that parse, validate and call plain functions.

mnist-dist train [--preset default] [--processes N] [OPTIONS]
mnist-dist train --config runs/<name>/config.json [OPTIONS]   # a saved config, options on top
mnist-dist evaluate runs/<name> [--json]
mnist-dist predict runs/<name> my-digits/ [--json] [--save-preprocessed DIR]
mnist-dist export runs/<name> --format onnx|torchscript|exported-program
mnist-dist report runs/<name>
mnist-dist compare runs/a runs/b [--out compare.png]
mnist-dist bench [--precision bf16] [--compile] [--json bench.json]
mnist-dist summary [--model net_wider]
mnist-dist download --data-dir DIR
mnist-dist --version
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from mnist_dist import env
from mnist_dist.config import ConfigError, TrainConfig, check_run_dir_free, default_data_dir, from_preset
from mnist_dist.options import CONFIG_PARAMS, KW, config_command, config_from_options
from mnist_dist.spec import TTA_LABEL, TTA_VIEWS

if TYPE_CHECKING:
    from mnist_dist.data import MNISTArrays

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)  # help: the callback's docstring


def versions() -> str:
    """What a bug report needs: the harness, torch, accelerate and the CUDA torch was built with."""
    import accelerate
    import torch

    import mnist_dist

    cuda = "none (a CPU build of torch)"
    if torch.version.cuda:
        cuda = f"{torch.version.cuda} ({torch.cuda.device_count()} GPU(s) visible)"
    rows = [("mnist-dist", mnist_dist.__version__), ("torch", torch.__version__),
            ("accelerate", accelerate.__version__), ("CUDA", cuda)]  # fmt: skip
    return "\n".join(f"{name:<11}{value}" for name, value in rows)


def _print_versions(given: bool) -> None:
    if given:
        typer.echo(versions())
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_versions, help="Print the versions and exit."
        ),
    ] = False,
) -> None:
    """Train the reference Net on MNIST, the same way on a CPU, one GPU, N GPUs or a cluster."""


LAUNCH_OPTIONS = ("processes", "nodes", "node_rank", "main_address", "main_port", "max_restarts")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one clear line (no traceback) and return the Exit to raise."""
    typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


_LAUNCH_PARAMS = [
    inspect.Parameter(
        "processes", KW, default=1,
        annotation=Annotated[int, typer.Option(min=1, help="Processes (GPUs, or CPU ranks) per node.", rich_help_panel="Distributed")],
    ),
    inspect.Parameter(
        "nodes", KW, default=1,
        annotation=Annotated[int, typer.Option(min=1, help="Nodes (machines) in the run.", rich_help_panel="Distributed")],
    ),
    inspect.Parameter(
        "node_rank", KW, default=0,
        annotation=Annotated[int, typer.Option(min=0, help="This node's rank, 0..nodes-1.", rich_help_panel="Distributed")],
    ),
    inspect.Parameter(
        "main_address", KW, default="127.0.0.1",
        annotation=Annotated[str, typer.Option(help="Address of node 0.", rich_help_panel="Distributed")],
    ),
    inspect.Parameter(
        "main_port", KW, default=None,
        annotation=Annotated[Optional[int], typer.Option(min=1, max=65535, help="Port on node 0 (default: a free one; required with --nodes > 1).", rich_help_panel="Distributed")],  # noqa: UP045
    ),
    inspect.Parameter(
        "max_restarts", KW, default=0,
        annotation=Annotated[int, typer.Option(min=0, help="Restart all of this node's ranks up to N times when one dies; they resume from the newest checkpoint (needs --resume auto).", rich_help_panel="Distributed")],
    ),
]  # fmt: skip


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------- train
def _under_launcher() -> bool:
    return env.LOCAL_RANK in os.environ or int(os.environ.get(env.WORLD_SIZE, "1")) > 1


def _world_size(launch: dict[str, Any]) -> int:
    """The world this command trains in: its launcher's when it is one rank, else the one it launches."""
    if _under_launcher() and env.WORLD_SIZE in os.environ:
        return int(os.environ[env.WORLD_SIZE])
    return launch["processes"] * launch["nodes"]


def _train_config(options: dict[str, Any], config_file: Path | None, launch: dict[str, Any]) -> TrainConfig:
    """The validated config of this command, for the world it will run in."""
    world = _world_size(launch)
    try:
        cfg = config_from_options(options, config_file)
        _check_restarts(launch["max_restarts"], world, cfg.resume)  # before --resume's folder is read
        cfg = cfg.validate(world_size=world, cuda=_cuda())
        _check_teachers(cfg)
        if launch["node_rank"] >= launch["nodes"]:
            raise ConfigError(f"--node-rank must be in 0..{launch['nodes'] - 1}, got {launch['node_rank']}")
        if launch["nodes"] > 1 and launch["main_port"] is None:
            raise ConfigError("--main-port is required with --nodes > 1 (every node must use the same one)")
    except ConfigError as e:
        raise fail(str(e)) from None
    return cfg


def _check_teachers(cfg: TrainConfig) -> None:
    """Bad --distill-from teachers refused by this command, before --print-config prints and before
    ranks or seeds start (each run checks them again as it loads them). Not in validate: reading a
    run's files imports the config module."""
    if cfg.distill_from is not None:
        import torch

        from mnist_dist.distill import Teachers

        Teachers.load(cfg, torch.device("cpu"))


def _check_restarts(restarts: int, world: int, resume: str | None) -> None:
    """--max-restarts restarts launched ranks, which must continue the run rather than start it again."""
    if not restarts:
        return
    if world == 1:
        raise ConfigError(
            f"--max-restarts {restarts} needs --processes or --nodes above 1: one process trains in this "
            "command, with no launcher to restart it"
        )
    if resume != "auto":
        raise ConfigError(
            f"--max-restarts {restarts} restarts the ranks from the run's newest checkpoint: it needs "
            f"--resume auto (got {'--resume ' + resume if resume else 'no --resume'})"
        )


def run_train(config_file: Path | None, print_config: bool, profile: int | None, **options: Any) -> None:
    """Validate everything, then print the config, train here or launch the ranks."""
    from mnist_dist import data as D

    launch = {k: options.pop(k) for k in LAUNCH_OPTIONS}
    cfg = _train_config(options, config_file, launch)
    if print_config:
        typer.echo(cfg.to_json())
        return
    hooks = _profile_hooks(profile, cfg, _world_size(launch))
    if _under_launcher():  # we are one rank of a launch: train here
        _train_or_fail(cfg, hooks)
        return
    if cfg.name is None:
        from mnist_dist.trainer import default_run_name

        cfg = cfg.replace(name=default_run_name(cfg))
    # Only node 0 checks: on other nodes, node 0's rank 0 may already have created the folder.
    if launch["node_rank"] == 0:
        try:
            check_run_dir_free(Path(cfg.output_dir) / cfg.name, cfg.resume)
        except ConfigError as e:
            raise fail(str(e)) from None
    try:  # verify (or download) the data once, before N ranks start; one process trains on it
        arrays = D.load_mnist(Path(cfg.data_dir) if cfg.data_dir else default_data_dir())
    except D.DataError as e:
        raise fail(str(e), code=1) from None
    if _world_size(launch) == 1:
        _train_or_fail(cfg, hooks, arrays)
    else:
        _launch_or_fail(cfg, launch)


def _profile_hooks(profile: int | None, cfg: TrainConfig, world: int) -> list[Any]:
    """``--profile N``: the hook that traces N steps of this one-process run, refused before any work
    where the run cannot hold them."""
    if profile is None:
        return []
    from mnist_dist.bench import ProfileSteps

    if world > 1:
        raise fail(f"--profile traces one process; this run has {world}: drop --processes/--nodes")
    needed, total = ProfileSteps.steps_needed(profile), cfg.epochs * cfg.steps_per_epoch(world)
    if total < needed:
        raise fail(
            f"--profile {profile} traces {ProfileSteps(profile).traced()} and needs {needed} steps; "
            f"this run has {total}: lower --profile or raise --epochs or --max-train-samples"
        )
    return [ProfileSteps(profile)]


def _train_or_fail(cfg: TrainConfig, hooks: Sequence[Any] = (), data: MNISTArrays | None = None) -> None:
    from mnist_dist.checkpoint_format import CheckpointError
    from mnist_dist.data import DataError
    from mnist_dist.faults import WRITE_FAILED_EXIT, Fault, write_failed
    from mnist_dist.preemption import Preempted, crashed, on_purpose, rank_started, stopped_on_purpose
    from mnist_dist.trainer import train

    def stop(message: str, code: int) -> typer.Exit:  # launched ranks record it (see on_purpose)
        return fail(message, code=stopped_on_purpose(code))

    rank_started()
    try:
        train(cfg, data=data, hooks=hooks)
    except Preempted as e:  # the main process already said where the checkpoint is
        raise typer.Exit(on_purpose(e.exit_code)) from None
    except (ConfigError, CheckpointError) as e:
        raise stop(str(e), 2) from None
    except DataError as e:
        raise stop(str(e), 1) from None
    except Fault as e:  # the same on every rank: rank 0 says it
        if os.environ.get(env.RANK, "0") != "0":
            raise typer.Exit(stopped_on_purpose(e.exit_code)) from None
        raise stop(str(e), e.exit_code) from None
    except OSError as e:  # a run file the main process writes as it goes (metrics.jsonl)
        then = "the run's newest checkpoint is intact: fix that, then run the same command with --resume auto"
        raise stop(str(write_failed(Path(cfg.output_dir), e, then)), WRITE_FAILED_EXIT) from None
    except Exception as e:
        crashed(e)
        raise
    for hook in hooks:  # --profile
        done = f"wrote a trace of {hook.traced()}: {hook.path}"
        typer.echo(done if hook.path else "--profile: the run ended before the steps to trace (resumed?)")


def _launch_or_fail(cfg: TrainConfig, launch: dict[str, Any]) -> None:
    from mnist_dist.launch import launch as launch_ranks
    from mnist_dist.preemption import INTERRUPTED_EXIT, PREEMPTED_EXIT

    code, cause = launch_ranks(cfg, **launch)
    stopped = {
        PREEMPTED_EXIT: "preempted: the ranks saved a checkpoint and stopped",
        INTERRUPTED_EXIT: "interrupted: the ranks stopped (after a checkpoint, if they were training)",
    }
    if code in stopped:
        typer.secho(
            f"{stopped[code]} (exit code {code}); the same command with --resume auto continues the run",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(code)
    if code and cause is None:  # a rank stopped on purpose and said why
        raise typer.Exit(code)
    if code:
        restarts = launch["max_restarts"]
        after = f" after {restarts} restart{'s' * (restarts > 1)}" if restarts else ""
        raise fail(f"training failed{after}: {cause}", code=code)


def _profile_param(where: str) -> inspect.Parameter:
    from mnist_dist.bench_options import PROFILE_SKIP

    return inspect.Parameter(
        "profile", KW, default=None,
        annotation=Annotated[Optional[int], typer.Option(min=1, metavar="N", help=f"Trace N optimizer steps of the training loop with torch.profiler, after {PROFILE_SKIP} untraced ones, into a Chrome trace (Perfetto, chrome://tracing, TensorBoard's profiler plugin): {where}.", rich_help_panel="Speed")],  # noqa: UP045
    )  # fmt: skip


def _make_train_command() -> Callable[..., None]:
    return config_command(
        run_train,
        [
            *CONFIG_PARAMS,
            *_LAUNCH_PARAMS,
            _profile_param("<run>/profile/loop.pt.trace.json; one process only"),
        ],
        "Train a model. Options not given come from --preset (or --config); --processes/--nodes launch "
        "ranks through Accelerate.",
    )


# ---------------------------------------------------------------------- sweep
def _parse_seeds(seeds: str) -> list[int]:
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise fail(f"--seeds must be comma-separated integers like 1,2,3; got {seeds!r}") from None
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise fail(f"--seeds must name at least one seed, each once; got {seeds!r}")
    return seed_list


def run_sweep_command(
    seeds: str,
    jobs: int,
    json_path: Path | None,
    config_file: Path | None,
    print_config: bool,
    **options: Any,
) -> None:
    """Validate, run every seed, print the table and write the JSON."""
    from mnist_dist.files import write_text_atomic
    from mnist_dist.sweep import format_table, run_sweep, seed_run_name

    seed_list = _parse_seeds(seeds)
    try:
        cfg = config_from_options(options, config_file)
        cfg = cfg.replace(name=cfg.name or f"sweep-{cfg.preset}").validate(cuda=_cuda())
        _check_teachers(cfg)
        if print_config:
            typer.echo(cfg.to_json())
            return
        for seed in seed_list:
            check_run_dir_free(Path(cfg.output_dir) / seed_run_name(cfg.name, seed), cfg.resume)
    except ConfigError as e:
        raise fail(str(e)) from None
    result = run_sweep(cfg, seed_list, jobs)
    typer.echo(format_table(result))
    out = write_text_atomic(
        json_path or Path(cfg.output_dir) / f"{cfg.name}.json", json.dumps(result, indent=2) + "\n"
    )
    typer.echo(f"wrote {out}")
    if result["failed_seeds"]:
        raise typer.Exit(1)


_SWEEP_PARAMS = [
    inspect.Parameter(
        "seeds", KW, default="1,2,3",
        annotation=Annotated[str, typer.Option(help="Comma-separated training seeds.", rich_help_panel="Sweep")],
    ),
    inspect.Parameter(
        "jobs", KW, default=1,
        annotation=Annotated[int, typer.Option(min=1, help="Runs at a time (CPU threads are shared among them unless --threads is given).", rich_help_panel="Sweep")],
    ),
    inspect.Parameter(
        "json_path", KW, default=None,
        annotation=Annotated[Optional[Path], typer.Option("--json", help="Where to write the results (default: <output-dir>/<name>.json).", rich_help_panel="Sweep")],  # noqa: UP045
    ),
    *CONFIG_PARAMS,
]  # fmt: skip


app.command("train")(_make_train_command())
app.command("sweep")(
    config_command(
        run_sweep_command,
        _SWEEP_PARAMS,
        "Train several seeds of a recipe and report final-epoch val/test accuracy: per seed, mean, std, min, max.",
    )
)


@app.command()
def summary(
    model: Annotated[
        str, typer.Option(help="Model: net (the reference design), net_wide or net_wider.")
    ] = "net",
) -> None:
    """Print a model's layer table: output shapes, parameters and receptive fields."""
    from mnist_dist.model import MODELS, build_model
    from mnist_dist.model import summary as model_summary

    if model not in MODELS:
        raise fail(f"--model must be one of {', '.join(MODELS)}; got {model!r}")
    typer.echo(model_summary(build_model(model)))


@app.command()
def download(
    data_dir: Annotated[
        Path | None,
        typer.Option(help=f"Where to stage MNIST/raw/*.gz (env {env.DATA_DIR}, else a user cache)."),
    ] = None,
) -> None:
    """Download and verify MNIST, e.g. on a login node, for compute nodes without network."""
    from mnist_dist import data as D

    root = data_dir or default_data_dir()
    try:
        D.load_mnist(root)
    except D.DataError as e:
        raise fail(str(e), code=1) from None
    typer.echo(f"MNIST verified in {D.raw_dir(root)}; use --data-dir {root} (or {env.DATA_DIR}={root})")


@app.command()
def evaluate(
    weights: Annotated[
        Path,
        typer.Argument(
            metavar="WEIGHTS_OR_RUN",
            help="A run folder, its model.safetensors, or a reference-design state dict (.pt/.pth).",
        ),
    ],
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Model the weights are for; default: the run's config.json, else the tensor shapes."
        ),
    ] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Root holding MNIST/raw/*.gz.")] = None,  # noqa: UP045
    split_seed: Annotated[int, typer.Option(help="Split seed the weights were trained with.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Evaluation batch.")] = TrainConfig.eval_batch_size,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the same results as JSON (per-class and confusion counts of both splits)."
        ),
    ] = False,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta",
            help=f"Also measure both splits under test-time augmentation ({TTA_LABEL}: "
            f"{', '.join(v.name for v in TTA_VIEWS)}; their probabilities averaged), beside the plain numbers.",
        ),
    ] = False,
) -> None:
    """Val and test accuracy of saved weights (loaded without running code), per class; test confusions."""
    from mnist_dist import data as D
    from mnist_dist.evaluate import evaluate_weights, format_report
    from mnist_dist.weights import WeightsError

    if not weights.exists():
        raise fail(f"weights file or run folder {weights} does not exist")
    if data_dir is not None and not data_dir.is_dir():
        raise fail(f"--data-dir {str(data_dir)!r} does not exist or is not a directory")
    try:
        result = evaluate_weights(weights, data_dir or default_data_dir(), split_seed, batch_size, model, tta)
    except WeightsError as e:
        raise fail(str(e)) from None
    except D.DataError as e:
        raise fail(str(e), code=1) from None
    typer.echo(json.dumps(result, indent=2) if as_json else format_report(result))


@app.command()
def predict(
    weights: Annotated[
        Path,
        typer.Argument(
            metavar="WEIGHTS_OR_RUN",
            help="A run folder, its model.safetensors, or a reference-design state dict (.pt/.pth).",
        ),
    ],
    images: Annotated[
        list[Path],
        typer.Argument(
            metavar="IMAGE_OR_FOLDER...",
            help="Pictures of one digit each: PNG, JPEG or any format Pillow reads; any size, colour or grey, "
            "dark on light or light on dark. A folder stands for its files, in name order; its subfolders "
            "are not entered, and a file in it that is not an image is an error line.",
        ),
    ],
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Model the weights are for; default: the run's config.json, else the tensor shapes."
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="One JSON object per line: file, digit and probabilities (10 floats)."),
    ] = False,
    save_preprocessed: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(metavar="DIR", help="Write each 28x28 digit the model saw to DIR as <file stem>.png."),
    ] = None,
) -> None:
    """Classify your own digit pictures, each brought into MNIST's form first (grey, light on black,
    fitted into 20x20, centred by its centre of mass). Exit code 1 when any file fails."""
    from mnist_dist.predict import Failure, input_files, output_dir_problem, predict_files, ready_model
    from mnist_dist.weights import WeightsError

    if not weights.exists():
        raise fail(f"weights file or run folder {weights} does not exist")
    if missing := [str(p) for p in images if not p.exists()]:
        raise fail(f"no such image or folder: {', '.join(missing)}")
    if save_preprocessed is not None and (problem := output_dir_problem(save_preprocessed)):
        raise fail(f"--save-preprocessed {save_preprocessed} {problem}")
    try:
        net = ready_model(weights, model)
    except WeightsError as e:
        raise fail(str(e)) from None
    failed = 0
    for result in predict_files(net, input_files(images), save_preprocessed):
        if isinstance(result, Failure):
            failed += 1
            typer.secho(f"Error: {result.line()}", fg=typer.colors.RED, err=True)
        else:
            typer.echo(json.dumps(result.to_json()) if as_json else result.line())
    if failed:
        raise typer.Exit(1)


@app.command()
def export(
    weights: Annotated[
        Path,
        typer.Argument(
            metavar="WEIGHTS_OR_RUN",
            help="A run folder, its model.safetensors, or a reference-design state dict (.pt/.pth).",
        ),
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="onnx (needs the export extra), torchscript or exported-program (torch.export's .pt2).",
        ),
    ],
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="File to write; default: beside the weights, <run>/model.onnx, .pt or .pt2."),
    ] = None,
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Model the weights are for; default: the run's config.json, else the tensor shapes."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    data_dir: Annotated[Optional[Path], typer.Option(help="Root holding MNIST/raw/*.gz.")] = None,  # noqa: UP045
) -> None:
    """Export weights for another runtime, checked on the 10k test images against PyTorch."""
    from mnist_dist import data as D
    from mnist_dist.export import ExportCheckError, ExportError, export_model
    from mnist_dist.weights import WeightsError

    if data_dir is not None and not data_dir.is_dir():
        raise fail(f"--data-dir {str(data_dir)!r} does not exist or is not a directory")
    try:
        result = export_model(weights, fmt, out, model=model, force=force, data_root=data_dir)
    except (ExportError, WeightsError) as e:
        raise fail(str(e)) from None
    except (ExportCheckError, D.DataError) as e:
        raise fail(str(e), code=1) from None
    typer.echo(result.line())
    typer.echo(result.how_to_load())


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (holds metrics.jsonl).")],
) -> None:
    """Draw a run's pictures again (curves, confusion matrix, misclassified digits) from its files."""
    from mnist_dist.plots import render_run
    from mnist_dist.runfiles import RunFilesError

    if not run_dir.is_dir():
        raise fail(f"run folder {run_dir} does not exist or is not a directory")
    try:
        written, skipped = render_run(run_dir)
    except RunFilesError as e:
        raise fail(str(e)) from None
    for path in written:
        typer.echo(f"wrote {path}")
    for reason in skipped:
        typer.echo(f"skipped {reason}")


@app.command()
def compare(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN...", help="Run folders (each holds metrics.jsonl).")
    ],
    out: Annotated[Path, typer.Option(help="The PNG of the runs' curves overlaid.")] = Path("compare.png"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the table as JSON (then 'wrote' goes to stderr).")
    ] = False,
) -> None:
    """Compare runs from their folders alone: a table of their results and one picture of their curves."""
    from mnist_dist.compare import compare as compare_runs
    from mnist_dist.compare import format_table
    from mnist_dist.runfiles import RunFilesError

    if out.is_dir() or not out.parent.is_dir():
        raise fail(f"--out {str(out)!r} must be a file in an existing folder")
    try:
        rows = compare_runs(run_dirs, out)
    except RunFilesError as e:
        raise fail(str(e)) from None
    typer.echo(json.dumps(rows, indent=2) if as_json else format_table(rows))
    typer.echo(f"wrote {out}", err=as_json)


# ---------------------------------------------------------------------- bench
def run_bench_command(
    preset: str,
    max_train_samples: int,
    epochs: int,
    steps: int | None,
    warmup_steps: int,
    rounds: int,
    workers: str | None,
    bare: str | None,
    conventional: bool,
    profile: int | None,
    json_path: Path,
    **options: Any,
) -> None:
    """Validate the recipe and the timing options, time them, print the table and write the JSON
    (with ``--profile``, a trace of the loop beside it)."""
    import shlex

    from mnist_dist import data as D
    from mnist_dist.bench import format_table, profile_loop, run_bench, write_json
    from mnist_dist.bench_options import BenchOptions, parse_list

    try:
        listed = {
            k: parse_list(v, f"--{k}", kind)
            for k, v, kind in (("workers", workers, int), ("bare", bare, str))
            if v is not None
        }
        opts = BenchOptions(
            from_preset(preset, **options), max_train_samples=max_train_samples, epochs=epochs, steps=steps,
            warmup_steps=warmup_steps, rounds=rounds, conventional=conventional, **listed,
        )  # fmt: skip
        opts.train_config("runs", "bench")
        result = run_bench(opts, command=shlex.join(["mnist-dist", *sys.argv[1:]]))
    except ConfigError as e:
        raise fail(str(e)) from None
    except D.DataError as e:
        raise fail(str(e), code=1) from None
    typer.echo(format_table(result))
    if profile:
        trace = profile_loop(opts, profile, json_path.with_name(f"{json_path.stem}.pt.trace.json"))
        result["profile"] = {"steps": profile, "trace": str(trace)}
        typer.echo(f"wrote a trace of {profile} steps of the loop: {trace}")
    write_json(result, json_path)
    typer.echo(f"wrote {json_path}")


_BENCH_PARAMS = [
    inspect.Parameter(
        "preset", KW, default="reference",
        annotation=Annotated[str, typer.Option(help="Recipe timed and projected: reference or default.", rich_help_panel="Run")],
    ),
    inspect.Parameter(
        "max_train_samples", KW, default=10_240,
        annotation=Annotated[int, typer.Option(help="Training samples the loop runs over.", rich_help_panel="Bench")],
    ),
    inspect.Parameter(
        "epochs", KW, default=2,
        annotation=Annotated[int, typer.Option(min=1, help="Timed epochs of the loop, after one warm-up epoch.", rich_help_panel="Bench")],
    ),
    inspect.Parameter(
        "steps", KW, default=None,
        annotation=Annotated[Optional[int], typer.Option(min=1, help="Timed steps of bare step and conventional pipeline (default: the loop's).", rich_help_panel="Bench")],  # noqa: UP045
    ),
    inspect.Parameter(
        "warmup_steps", KW, default=10,
        annotation=Annotated[int, typer.Option(min=1, help="Untimed steps before bare and conventional timings.", rich_help_panel="Bench")],
    ),
    inspect.Parameter(
        "rounds", KW, default=3,
        annotation=Annotated[int, typer.Option(min=1, help="Interleaved rounds of all measurements; medians are reported.", rich_help_panel="Bench")],
    ),
    inspect.Parameter(
        "conventional", KW, default=True,
        annotation=Annotated[bool, typer.Option("--conventional/--no-conventional", help="Also time the conventional pipeline.", rich_help_panel="Bench")],
    ),
    inspect.Parameter(
        "json_path", KW, default=Path("bench.json"),
        annotation=Annotated[Path, typer.Option("--json", help="Where to write every number as JSON.", rich_help_panel="Bench")],
    ),
]  # fmt: skip


def _bench_list_params() -> list[inspect.Parameter]:
    """The options that list what to time, their defaults shown from BenchOptions."""
    from mnist_dist.bench_options import BenchOptions

    listed = {
        "workers": "DataLoader worker counts of the conventional pipeline, each timed; the fastest is compared",
        "bare": "Bare-step variants timed; the fastest is compared",
    }
    return [
        inspect.Parameter(name, KW, default=None, annotation=Annotated[Optional[str], typer.Option(  # noqa: UP045
            help=f"{text} (default: {','.join(map(str, getattr(BenchOptions(), name)))}).", rich_help_panel="Bench",
        )])
        for name, text in listed.items()
    ]  # fmt: skip


def _make_bench_command() -> Callable[..., None]:
    from mnist_dist.bench_options import OPTION_FIELDS

    return config_command(
        run_bench_command,
        [
            *_BENCH_PARAMS,
            *_bench_list_params(),
            _profile_param("<json>.pt.trace.json beside --json, run apart from the timed rounds"),
        ],
        "Time the training loop against the bare model step (its ceiling) and the conventional pipeline.",
        names=OPTION_FIELDS,
        base="reference",
    )


app.command("bench")(_make_bench_command())


def train_entry() -> None:
    """``python -m mnist_dist.train``: the train command alone, same options."""
    command = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    command.command()(_make_train_command())
    command(prog_name="python -m mnist_dist.train")


def main() -> None:
    app(prog_name="mnist-dist")


if __name__ == "__main__":
    sys.exit(main())
