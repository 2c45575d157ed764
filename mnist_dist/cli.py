"""The ``mnist-dist`` command line: thin commands that parse, validate and call plain functions.

mnist-dist train [--preset default] [--processes N] [OPTIONS]
mnist-dist evaluate runs/<name>/model.safetensors
mnist-dist report runs/<name>
mnist-dist bench [--precision bf16] [--compile] [--json bench.json]
mnist-dist summary
mnist-dist download --data-dir DIR
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mnist_dist.config import PRESETS, ConfigError, TrainConfig, default_data_dir, from_preset

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train the reference Net on MNIST, the same way on a CPU, one GPU, N GPUs or a cluster.",
)

_TYPES: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "int | None": Optional[int],  # noqa: UP045 - Typer needs the runtime object
    "str | None": Optional[str],  # noqa: UP045
}
LAUNCH_OPTIONS = ("processes", "nodes", "node_rank", "main_address", "main_port")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one clear line (no traceback) and return the Exit to raise."""
    typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _number_parser(kind: type) -> Any:
    """Typer's own message for `--epochs abc` does not repeat the value: this one does."""
    word = "an integer" if kind is int else "a number"

    def parse(value: str) -> Any:
        try:
            return kind(value)
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not {word}") from None

    return parse


def _config_parameters() -> list[inspect.Parameter]:
    """One CLI option per TrainConfig field; None means 'take it from the preset'."""
    base = TrainConfig()
    params = []
    for f in dataclasses.fields(TrainConfig):
        shown = getattr(PRESETS["default"](), f.name)
        ref = getattr(base, f.name)
        note = f"(default: {shown}" + (f"; reference preset: {ref})" if ref != shown else ")")
        help_text = f"{f.metadata['help']} {note}" if f.name != "preset" else f.metadata["help"]
        kind = f.type.removesuffix(" | None")
        parser = _number_parser(_TYPES[kind]) if kind in ("int", "float") else None
        option = typer.Option(
            help=help_text, rich_help_panel=f.metadata["panel"], show_default=False, parser=parser
        )
        annotation = Annotated[_TYPES[f.type] if f.type.endswith("None") else _TYPES[f.type] | None, option]
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        )
    return params


_LAUNCH_PARAMS = [
    inspect.Parameter(
        "processes", inspect.Parameter.KEYWORD_ONLY, default=1,
        annotation=Annotated[int, typer.Option(min=1, help="Processes (GPUs, or CPU ranks) per node.", rich_help_panel="Distributed")],
    ),
    inspect.Parameter(
        "nodes", inspect.Parameter.KEYWORD_ONLY, default=1,
        annotation=Annotated[int, typer.Option(min=1, help="Nodes (machines) in the run.", rich_help_panel="Distributed")],
    ),
    inspect.Parameter(
        "node_rank", inspect.Parameter.KEYWORD_ONLY, default=0,
        annotation=Annotated[int, typer.Option(min=0, help="This node's rank, 0..nodes-1.", rich_help_panel="Distributed")],
    ),
    inspect.Parameter(
        "main_address", inspect.Parameter.KEYWORD_ONLY, default="127.0.0.1",
        annotation=Annotated[str, typer.Option(help="Address of node 0.", rich_help_panel="Distributed")],
    ),
    inspect.Parameter(
        "main_port", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Optional[int], typer.Option(min=1, max=65535, help="Port on node 0 (default: a free one; required with --nodes > 1).", rich_help_panel="Distributed")],  # noqa: UP045
    ),
]  # fmt: skip


def config_from_options(options: dict[str, Any]) -> TrainConfig:
    """The preset's config with the options the user gave on top."""
    preset = options.pop("preset", None) or "default"
    return from_preset(preset, **options)


def _under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_train(**options: Any) -> None:
    """Validate everything, then train here or launch the ranks."""
    import torch

    from mnist_dist import data as D
    from mnist_dist.train import default_run_name, train

    launch = {k: options.pop(k) for k in LAUNCH_OPTIONS}
    world = launch["processes"] * launch["nodes"]
    try:
        cfg = config_from_options(options)
        cfg.validate(world_size=world, cuda=torch.cuda.is_available())
        if launch["node_rank"] >= launch["nodes"]:
            raise ConfigError(f"--node-rank must be in 0..{launch['nodes'] - 1}, got {launch['node_rank']}")
        if launch["nodes"] > 1 and launch["main_port"] is None:
            raise ConfigError("--main-port is required with --nodes > 1 (every node must use the same one)")
    except ConfigError as e:
        raise fail(str(e)) from None
    if _under_launcher():  # we are one rank of a launch: train here
        _train_or_fail(train, cfg)
        return
    if cfg.name is None:
        cfg = cfg.replace(name=default_run_name(cfg))
    run_dir = Path(cfg.output_dir) / cfg.name
    # Only node 0 checks: on other nodes, node 0's rank 0 may already have created the folder.
    if launch["node_rank"] == 0 and run_dir.exists() and cfg.resume is None:
        raise fail(
            f"run folder {run_dir} already exists; pick another --name, or --resume auto to continue it"
        )
    try:  # verify (or download) the data once, before N ranks start
        D.load_mnist(Path(cfg.data_dir) if cfg.data_dir else default_data_dir())
    except D.DataError as e:
        raise fail(str(e), code=1) from None
    if world == 1:
        _train_or_fail(train, cfg)
        return
    from mnist_dist.checkpoint import PREEMPTED_EXIT
    from mnist_dist.launch import launch as launch_ranks

    code = launch_ranks(cfg, **launch)
    if code == PREEMPTED_EXIT:
        typer.secho(
            f"preempted: the ranks saved a checkpoint and stopped (exit code {code}); "
            "the same command with --resume auto continues the run",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(code)
    if code:
        raise fail(f"training failed: a rank exited with code {code} (its error is shown above)", code=code)


def _train_or_fail(train: Any, cfg: TrainConfig) -> None:
    from mnist_dist.checkpoint import PREEMPTED_EXIT, CheckpointError, Preempted
    from mnist_dist.data import DataError

    try:
        train(cfg)
    except Preempted:  # the main process already said where the checkpoint is
        raise typer.Exit(PREEMPTED_EXIT) from None
    except (ConfigError, CheckpointError) as e:
        raise fail(str(e)) from None
    except DataError as e:
        raise fail(str(e), code=1) from None


def _config_command(run: Any, extra: list[inspect.Parameter], doc: str) -> Any:
    """A Typer command whose options are every TrainConfig field plus ``extra``."""

    def command(**options: Any) -> None:
        run(**options)

    params = [*_config_parameters(), *extra]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return command


def _make_train_command() -> Any:
    return _config_command(
        run_train,
        _LAUNCH_PARAMS,
        "Train Net. Options not given come from --preset; --processes/--nodes launch ranks through Accelerate.",
    )


def run_sweep_command(seeds: str, jobs: int, json_path: Path | None, **options: Any) -> None:
    """Validate, run every seed, print the table and write the JSON."""
    import json

    import torch

    from mnist_dist.sweep import format_table, run_sweep

    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise fail(f"--seeds must be comma-separated integers like 1,2,3; got {seeds!r}") from None
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise fail(f"--seeds must name at least one seed, each once; got {seeds!r}")
    try:
        cfg = config_from_options(options)
        cfg = cfg.replace(name=cfg.name or f"sweep-{cfg.preset}").validate(cuda=torch.cuda.is_available())
    except ConfigError as e:
        raise fail(str(e)) from None
    clashes = [s for s in seed_list if (Path(cfg.output_dir) / f"{cfg.name}-seed{s}").exists()]
    if clashes:
        raise fail(f"run folders for seeds {clashes} already exist in {cfg.output_dir}; pick another --name")
    result = run_sweep(cfg, seed_list, jobs)
    typer.echo(format_table(result))
    out = json_path or Path(cfg.output_dir) / f"{cfg.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(f"wrote {out}")
    if result["failed_seeds"]:
        raise typer.Exit(1)


_SWEEP_PARAMS = [
    inspect.Parameter(
        "seeds", inspect.Parameter.KEYWORD_ONLY, default="1,2,3",
        annotation=Annotated[str, typer.Option(help="Comma-separated training seeds.", rich_help_panel="Sweep")],
    ),
    inspect.Parameter(
        "jobs", inspect.Parameter.KEYWORD_ONLY, default=1,
        annotation=Annotated[int, typer.Option(min=1, help="Runs at a time (CPU threads are shared among them).", rich_help_panel="Sweep")],
    ),
    inspect.Parameter(
        "json_path", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Optional[Path], typer.Option("--json", help="Where to write the results (default: <output-dir>/<name>.json).", rich_help_panel="Sweep")],  # noqa: UP045
    ),
]  # fmt: skip


app.command("train")(_make_train_command())
app.command("sweep")(
    _config_command(
        run_sweep_command,
        _SWEEP_PARAMS,
        "Train several seeds of a recipe and report final-epoch val/test accuracy: per seed, mean, std, min, max.",
    )
)


@app.command()
def summary() -> None:
    """Print Net's layer table: output shapes, parameters and receptive fields."""
    from mnist_dist.model import Net
    from mnist_dist.model import summary as model_summary

    typer.echo(model_summary(Net()))


@app.command()
def download(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Where to stage MNIST/raw/*.gz (env MNIST_DATA_DIR, else a user cache)."),
    ] = None,
) -> None:
    """Download and verify MNIST, e.g. on a login node, for compute nodes without network."""
    from mnist_dist import data as D

    root = data_dir or default_data_dir()
    try:
        D.load_mnist(root)
    except D.DataError as e:
        raise fail(str(e), code=1) from None
    typer.echo(f"MNIST verified in {D.raw_dir(root)}; use --data-dir {root} (or MNIST_DATA_DIR={root})")


@app.command()
def evaluate(
    weights: Annotated[
        Path, typer.Argument(help="model.safetensors of a run, or a reference-design state dict (.pt/.pth).")
    ],
    data_dir: Annotated[Optional[Path], typer.Option(help="Root holding MNIST/raw/*.gz.")] = None,  # noqa: UP045
    split_seed: Annotated[int, typer.Option(help="Split seed the weights were trained with.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Evaluation batch.")] = 2000,
) -> None:
    """Validation and test accuracy of saved weights (loaded without executing code)."""
    from mnist_dist import data as D
    from mnist_dist.evaluate import WeightsError, evaluate_weights

    if not weights.is_file():
        raise fail(f"weights file {weights} does not exist")
    if data_dir is not None and not data_dir.is_dir():
        raise fail(f"--data-dir {str(data_dir)!r} does not exist or is not a directory")
    try:
        result = evaluate_weights(weights, data_dir or default_data_dir(), split_seed, batch_size)
    except WeightsError as e:
        raise fail(str(e)) from None
    except D.DataError as e:
        raise fail(str(e), code=1) from None
    typer.echo(
        f"val  {100 * result['val_acc']:.2f}%  ({result['val_count']:,} images, split seed {split_seed})"
    )
    typer.echo(f"test {100 * result['test_acc']:.2f}%  ({result['test_count']:,} images)")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (holds metrics.jsonl).")],
) -> None:
    """Draw a run's pictures again (curves, confusion matrix, misclassified digits) from its files."""
    from mnist_dist.plots import RunFilesError, render_run

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
def bench(
    preset: Annotated[
        str, typer.Option(help="Recipe timed and projected: reference or default.")
    ] = "reference",
    precision: Annotated[
        str | None, typer.Option(help="no, bf16 or fp16 (GPU only) (default: the preset's).")
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option("--compile/--no-compile", help="torch.compile the model (default: the preset's)."),
    ] = None,
    channels_last: Annotated[
        bool | None,
        typer.Option(
            "--channels-last/--no-channels-last", help="channels_last memory format (default: the preset's)."
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch size (default: the preset's).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: all cores).")] = None,
    max_train_samples: Annotated[
        int, typer.Option(min=1, max=50_000, help="Training samples the loop runs over.")
    ] = 10_240,
    epochs: Annotated[
        int, typer.Option(min=1, help="Timed epochs of the loop, after one warm-up epoch.")
    ] = 2,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Timed steps of bare step and conventional pipeline (default: the loop's)."),
    ] = None,
    warmup_steps: Annotated[
        int, typer.Option(min=1, help="Untimed steps before bare and conventional timings.")
    ] = 10,
    rounds: Annotated[
        int, typer.Option(min=1, help="Interleaved rounds of all measurements; medians are reported.")
    ] = 3,
    workers: Annotated[
        int | None,
        typer.Option(min=0, help="DataLoader workers of the conventional pipeline (default: min(4, cores))."),
    ] = None,
    conventional: Annotated[
        bool, typer.Option("--conventional/--no-conventional", help="Also time the conventional pipeline.")
    ] = True,
    data_dir: Annotated[Path | None, typer.Option(help="Root holding MNIST/raw/*.gz.")] = None,
    json_path: Annotated[Path, typer.Option("--json", help="Where to write every number as JSON.")] = Path(
        "bench.json"
    ),
) -> None:
    """Time the training loop against the bare model step (its ceiling) and the conventional pipeline."""
    import shlex

    from mnist_dist import data as D
    from mnist_dist.bench import BenchOptions, format_table, run_bench, write_json

    opts = BenchOptions(
        preset=preset, precision=precision, compile=compile, channels_last=channels_last,
        batch_size=batch_size, threads=threads, max_train_samples=max_train_samples, epochs=epochs,
        steps=steps, warmup_steps=warmup_steps, rounds=rounds, workers=workers,
        conventional=conventional, data_dir=str(data_dir) if data_dir else None,
    )  # fmt: skip
    try:
        opts.train_config("runs", "bench")
        result = run_bench(opts, command=shlex.join(["mnist-dist", *sys.argv[1:]]))
    except ConfigError as e:
        raise fail(str(e)) from None
    except D.DataError as e:
        raise fail(str(e), code=1) from None
    typer.echo(format_table(result))
    write_json(result, json_path)
    typer.echo(f"wrote {json_path}")


def train_entry() -> None:
    """``python -m mnist_dist.train``: the train command alone, same options."""
    command = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    command.command()(_make_train_command())
    command(prog_name="python -m mnist_dist.train")


def main() -> None:
    app(prog_name="mnist-dist")


if __name__ == "__main__":
    sys.exit(main())
