"""The config: strict JSON in, presets as plain values, every pre-launch refusal, and the CLI's options
and --config/--print-config built from it. In-process and data-free: no test here trains or reads MNIST."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_type_hints

import pytest
import typer
from typer.testing import CliRunner

from mnist_dist import data as D
from mnist_dist import spec
from mnist_dist.cli import app
from mnist_dist.config import (
    ConfigError,
    TrainConfig,
    check_run_dir_free,
    default,
    from_preset,
    read_config_file,
    reference,
)
from mnist_dist.model import MODELS
from mnist_dist.options import config_command, config_parameters, option_type


def flat(text: str) -> str:
    """Typer's error panel wraps lines in box characters: compare the words alone."""
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


# ---------------------------------------------------------------------- presets
def test_the_dataclass_defaults_are_the_default_preset() -> None:
    assert TrainConfig() == default() == from_preset("default")
    assert TrainConfig().preset == "default"


def test_reference_is_the_reference_recipe_exactly() -> None:
    ref = reference()
    assert (ref.preset, ref.model, ref.epochs, ref.batch_size, ref.optimizer) == (
        "reference",
        "net",
        19,
        128,
        "adam",
    )
    assert (ref.lr, ref.max_lr, ref.pct_start, ref.div_factor, ref.final_div_factor) == (
        5e-4,
        5e-3,
        0.2,
        25.0,
        1e4,
    )
    assert (ref.weight_decay, ref.label_smoothing, ref.rotate, ref.translate, ref.scale) == (
        1e-4,
        0,
        7.0,
        0,
        0,
    )
    assert (ref.interpolation, ref.elastic, ref.ema, ref.precision) == ("nearest", 0.0, 0.0, "no")
    changed = {k: (v, getattr(default(), k)) for k, v in ref.to_dict().items() if v != getattr(default(), k)}
    assert changed == {
        "preset": ("reference", "default"),
        "model": ("net", "net_wider"),
        "max_lr": (5e-3, 1e-2),
        "translate": (0.0, 2.0),
        "elastic": (0.0, 12.0),
        "ema": (0.0, 0.999),
    }
    assert from_preset("reference", epochs=3, lr=None) == ref.replace(epochs=3)
    with pytest.raises(ConfigError, match="--preset must be one of reference, default; got 'nope'"):
        from_preset("nope")


def test_model_choices_are_the_models_module_s() -> None:
    for name in MODELS:
        TrainConfig(model=name).validate()
    with pytest.raises(ConfigError, match=f"--model must be one of {', '.join(MODELS)}; got 'resnet'"):
        TrainConfig(model="resnet").validate()


# ---------------------------------------------------------------------- strict JSON
@pytest.mark.parametrize("cfg", [default(), reference(), reference().replace(threads=3, name="x", lr=1e-3)])
def test_json_round_trips_exactly(cfg: TrainConfig) -> None:
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


REFUSED = [
    ({"epoch": 3}, "config.json: unknown key 'epoch' (did you mean 'epochs'?)"),
    ({"colour": "red"}, "config.json: unknown key 'colour' (not a config field; --print-config lists them)"),
    ({"epochs": "3"}, "config.json: 'epochs' must be an int, got \"3\""),
    ({"epochs": 3.0}, "config.json: 'epochs' must be an int, got 3.0"),
    ({"epochs": True}, "config.json: 'epochs' must be an int, got true"),
    ({"epochs": None}, "config.json: 'epochs' must be an int, got null"),
    ({"lr": False}, "config.json: 'lr' must be a number, got false"),
    ({"compile": 1}, "config.json: 'compile' must be true or false or null, got 1"),
    ({"threads": "2"}, "config.json: 'threads' must be an int or null, got \"2\""),
    ({"name": 7}, "config.json: 'name' must be a string or null, got 7"),
    ({"preset": "best"}, "config.json: 'preset' must be one of reference, default; got \"best\""),
    ([1, 2], "config.json: must be a JSON object of config fields, got [1, 2]"),
]


@pytest.mark.parametrize(("data", "message"), REFUSED, ids=[m.split(": ", 1)[1] for _, m in REFUSED])
def test_from_dict_refuses_by_name(data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(data, source="config.json")
    assert str(e.value) == message


def test_from_dict_takes_ints_for_floats_and_the_named_preset_for_missing_keys() -> None:
    cfg = TrainConfig.from_dict({"preset": "reference", "lr": 1, "threads": None, "epochs": 2})
    assert cfg == reference().replace(lr=1.0, epochs=2) and type(cfg.lr) is float
    assert TrainConfig.from_dict({}) == default()


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        read_config_file(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"epochs": 3,}')
    with pytest.raises(ConfigError, match=rf"^{bad}: not valid JSON \(.*line 1 column 14\)"):
        read_config_file(bad)
    good = tmp_path / "good.json"
    good.write_text(reference().to_json())
    assert read_config_file(good) == reference()


# ---------------------------------------------------------------------- pre-launch checks
def test_steps_per_epoch_is_the_sampler_s_own_count() -> None:
    for n, batch, world, accum, global_batch in [
        (50_000, 128, 1, 1, None), (4096, 128, 2, 1, None), (1000, 64, 3, 2, None),
        (129, 128, 1, 1, None), (257, 128, 2, 1, None), (1001, 7, 5, 1, 140), (5, 1, 4, 1, None),
    ]:  # fmt: skip
        cfg = TrainConfig(
            max_train_samples=n, batch_size=batch, grad_accum=accum, global_batch_size=global_batch
        )
        sampler = D.ShardedSampler(n, cfg.per_process_batch(world), world, 0, 1, accum)
        assert cfg.steps_per_epoch(world) == sampler.steps_per_epoch(), (n, batch, world, accum)
        assert spec.step_bounds(n, cfg.per_process_batch(world) * world * accum, world) == sampler._bounds


def test_one_step_warm_up_is_refused_before_launch() -> None:
    cfg = TrainConfig(max_train_samples=128, epochs=5, pct_start=0.2)  # 5 steps, 20 % of them warm-up
    with pytest.raises(ConfigError, match=r"--pct-start 0\.2 of 5 steps is a one-step warm-up"):
        cfg.validate()
    cfg.replace(epochs=6).validate()


def test_fewer_samples_than_ranks_is_refused_before_launch() -> None:
    with pytest.raises(ConfigError, match="--max-train-samples 1 is fewer than the 2 processes"):
        TrainConfig(max_train_samples=1).validate(world_size=2)
    TrainConfig(max_train_samples=2, pct_start=0.1).validate(world_size=2)


def test_sync_bn_needs_gpus_with_more_than_one_rank() -> None:
    with pytest.raises(ConfigError, match="--sync-bn needs GPUs: SyncBatchNorm has no CPU implementation"):
        TrainConfig(sync_bn=True).validate(world_size=2, cuda=False)
    TrainConfig(sync_bn=True).validate(world_size=1, cuda=False)  # one process converts nothing
    TrainConfig(sync_bn=True).validate(world_size=2, cuda=True)


def test_a_taken_run_folder_is_refused_unless_resumed(tmp_path: Path) -> None:
    check_run_dir_free(tmp_path / "new", None)
    with pytest.raises(ConfigError, match=f"run folder {tmp_path} already exists; pick another --name"):
        check_run_dir_free(tmp_path, None)
    check_run_dir_free(tmp_path, "auto")


# ---------------------------------------------------------------------- --config and --print-config
def _printed(args: list[str]) -> dict[str, Any]:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_config_file_is_the_base_and_options_override_it(tmp_path: Path) -> None:
    saved = tmp_path / "config.json"
    saved.write_text(reference().replace(epochs=3, seed=7).to_json())
    runs = tmp_path / "runs"
    printed = _printed(
        ["train", "--config", str(saved), "--batch-size", "64", "--output-dir", str(runs), "--print-config"]
    )
    assert TrainConfig.from_dict(printed) == reference().replace(
        epochs=3, seed=7, batch_size=64, output_dir=str(runs)
    )
    assert not runs.exists()  # nothing but the printing happened
    again = tmp_path / "again.json"
    again.write_text(json.dumps(printed))
    assert _printed(["train", "--config", str(again), "--print-config"]) == printed
    sweep = _printed(["sweep", "--config", str(saved), "--print-config", "--output-dir", str(runs)])
    assert sweep["name"] == "sweep-reference" and sweep["epochs"] == 3 and not runs.exists()


def test_print_config_without_a_file_prints_the_preset_with_options(tmp_path: Path) -> None:
    printed = _printed(["train", "--preset", "reference", "--lr", "0.001", "--print-config"])
    assert TrainConfig.from_dict(printed) == reference().replace(lr=1e-3)


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ('{"epoch": 3}', [], "unknown key 'epoch' (did you mean 'epochs'?)"),
        ('{"epochs": "3"}', [], "'epochs' must be an int, got \"3\""),
        ("{}", ["--preset", "reference"], "--preset reference cannot be combined with --config"),
        ('{"epochs": 3}', ["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    ],
)
def test_bad_config_files_are_refused_by_name(
    tmp_path: Path, content: str, extra: list[str], message: str
) -> None:
    saved = tmp_path / "config.json"
    saved.write_text(content)
    for command in ("train", "sweep"):
        result = CliRunner().invoke(
            app, [command, "--config", str(saved), "--output-dir", str(tmp_path / "runs"), *extra]
        )
        assert result.exit_code == 2, result.output
        assert message in flat(result.output) and "Traceback" not in result.output
        assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------- options from the type hints
def test_every_field_s_option_type_is_its_type_hint_without_none() -> None:
    hints = get_type_hints(TrainConfig)
    params = {p.name: p for p in config_parameters()}
    assert set(params) == {f.name for f in dataclasses.fields(TrainConfig)}
    for name, hint in hints.items():
        (annotation, _option) = get_args(params[name].annotation)
        assert annotation == Optional[option_type(hint)]  # noqa: UP045
        assert option_type(hint) in (int, float, str, bool), (name, hint)
        assert type(None) not in get_args(option_type(hint))


def _with_new_fields() -> type[TrainConfig]:
    """TrainConfig plus fields of types it does not have yet, as a future change would add them."""

    def opt(default: Any) -> Any:
        return dataclasses.field(default=default, metadata={"help": "A new option.", "panel": "Run"})

    return dataclasses.make_dataclass(
        "Extended",
        [
            ("mode", Literal["fast", "exact"], opt("exact")),
            ("root", Optional[Path], opt(None)),  # noqa: UP045
            ("crop", tuple[int, int], opt((28, 28))),
        ],
        bases=(TrainConfig,),
        frozen=True,
    )


def test_a_field_of_a_new_type_is_an_option_and_a_json_key_with_no_second_edit() -> None:
    extended = _with_new_fields()
    seen: list[dict[str, Any]] = []
    command = typer.Typer()
    command.command()(config_command(lambda **options: seen.append(options), [], "test", cls=extended))
    result = CliRunner().invoke(
        command, ["--mode", "fast", "--root", "/data", "--crop", "20", "24", "--epochs", "2"]
    )
    assert result.exit_code == 0, result.output
    assert (seen[0]["mode"], seen[0]["root"], seen[0]["crop"], seen[0]["epochs"]) == (
        "fast",
        Path("/data"),
        (20, 24),
        2,
    )
    refused = CliRunner().invoke(command, ["--mode", "slow"])
    assert refused.exit_code == 2 and "'slow' is not one of 'fast', 'exact'" in flat(refused.output)
    cfg = extended.from_dict({"preset": "reference", "mode": "fast", "root": "/data", "crop": [20, 24]})
    assert (cfg.mode, cfg.root, cfg.crop, cfg.model) == ("fast", Path("/data"), (20, 24), "net")
    assert extended.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match='\'mode\' must be one of "fast", "exact", got "slow"'):
        extended.from_dict({"mode": "slow"})
    with pytest.raises(ConfigError, match=r"'crop' must be a list, got \[1\]"):
        extended.from_dict({"crop": [1]})
