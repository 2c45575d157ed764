"""The training options of every command that trains, generated from ``TrainConfig``'s fields: one
option per field, typed by its hint, helped by its metadata, and None when not given, so that a
command's config is the recipe with exactly the options the user gave on top.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional, Union, get_args, get_origin, get_type_hints

import typer

from mnist_dist.config import PRESETS, ConfigError, TrainConfig, from_preset, read_config_file

KW = inspect.Parameter.KEYWORD_ONLY


def _number_parser(kind: type) -> Any:
    """Typer's own message for `--epochs abc` does not repeat the value: this one does."""
    word = "an integer" if kind is int else "a number"

    def parse(value: str) -> Any:
        try:
            return kind(value)
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not {word}") from None

    return parse


def option_type(hint: Any) -> Any:
    """The type an option of a field of this type hint parses to: the hint without its None (every
    option may be left out, which means 'keep the recipe's value')."""
    if get_origin(hint) in (Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _preset_note(name: str, default: Any, base: str) -> str:
    """What the option's value is when left out: the command's preset's, and any other preset's."""
    values = {p: getattr(make(), name, default) for p, make in PRESETS.items()}
    if values[base] is None:
        return ""
    others = "".join(f"; {p} preset: {v}" for p, v in values.items() if p != base and v != values[base])
    return f" (default: {values[base]}{others})"


def config_parameters(
    cls: type[TrainConfig] = TrainConfig, names: Sequence[str] | None = None, base: str = "default"
) -> list[inspect.Parameter]:
    """One CLI option per config field (or per field named), typed by the field's type hint;
    None means 'not given'. ``base`` is the preset the command starts from, for the help's notes."""
    hints = get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        kind = option_type(hints[f.name])
        note = "" if f.name == "preset" else _preset_note(f.name, f.default, base)
        option = typer.Option(
            help=f.metadata["help"] + note,
            rich_help_panel=f.metadata["panel"],
            show_default=False,
            parser=_number_parser(kind) if kind in (int, float) else None,
        )
        annotation = Annotated[Optional[kind], option]  # noqa: UP045 - Typer reads the runtime object
        params.append(inspect.Parameter(f.name, KW, default=None, annotation=annotation))
    return params


CONFIG_PARAMS = [
    inspect.Parameter(
        "config_file", KW, default=None,
        annotation=Annotated[Optional[Path], typer.Option("--config", help="JSON file of config fields (e.g. a run's config.json): the recipe, which the options given override. Not with --preset.", rich_help_panel="Run")],  # noqa: UP045
    ),
    inspect.Parameter(
        "print_config", KW, default=False,
        annotation=Annotated[bool, typer.Option("--print-config", help="Print the resolved, validated config as JSON (a --config file) and exit, doing nothing else.", rich_help_panel="Run")],
    ),
]  # fmt: skip


def config_command(
    run: Callable[..., None],
    extra: list[inspect.Parameter],
    doc: str,
    names: Sequence[str] | None = None,
    base: str = "default",
    cls: type[TrainConfig] = TrainConfig,
) -> Callable[..., None]:
    """A Typer command whose options are the config's fields (or those named) plus ``extra``."""

    def command(**options: Any) -> None:
        run(**options)

    params = [*config_parameters(cls, names, base), *extra]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return command


def config_from_options(options: dict[str, Any], config_file: Path | None = None) -> TrainConfig:
    """The recipe (the --config file's, else the preset's) with the options the user gave on top."""
    preset = options.pop("preset", None)
    given = {k: v for k, v in options.items() if v is not None}
    if config_file is None:
        return from_preset(preset or "default", **given)
    if preset is not None:
        raise ConfigError(
            f"--preset {preset} cannot be combined with --config: the file carries its own recipe "
            "(its 'preset' field); override single fields with their options instead"
        )
    return read_config_file(config_file).replace(**given)
