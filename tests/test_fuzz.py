"""Fuzzed inputs (hypothesis): the two things a user hands the harness, a training config and a
weights file, drawn at random, each either refused with exit 2 and one message naming it or
accepted. Never a traceback, a hang, a huge allocation, code run from a pickle, or a half-made run
folder. In-process, on tiny synthetic digits.

Config fields are enumerated from ``TrainConfig`` and each gets values from its type hint (near the
valid ones) and from any type at all (NaN, inf, huge and negative numbers, empty, unicode and NUL
text, bools, None, lists), several fields at a time, through both entry points: the CLI options and
a ``--config`` file. Every draw runs with ``--print-config``, which validates exactly as a run does;
a few draws, from bounded values only, also train for real (``TRAIN_BOUNDS``).

``HYPOTHESIS_PROFILE=fuzz`` draws thousands of inputs instead of the fast tier's hundreds;
``MNIST_DIST_FUZZ_COUNTS=FILE`` writes how many inputs were tried, refused, accepted and trained.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import pickle
import re
import resource
import signal
import struct
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, get_args, get_type_hints

import pytest
import torch
import typer.testing
from accelerate.state import AcceleratorState
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save as safetensors_bytes
from typer.testing import CliRunner, Result

from mnist_dist import data as D
from mnist_dist import runfiles
from mnist_dist.cli import app
from mnist_dist.config import (
    INTERPOLATIONS,
    OPTIMIZERS,
    PRECISIONS,
    PRESETS,
    WANDB_MODES,
    TrainConfig,
)
from mnist_dist.faults import DIVERGED_EXIT
from mnist_dist.model import MODELS, build_model
from mnist_dist.options import option_type

from .helpers import RunsCode
from .test_cli import flat

# Examples per test: refusals cost milliseconds, a training seconds (most of it drawing its pictures).
EXAMPLES = {
    "fast": {"config": 200, "config file": 100, "weights": 100, "training": 3},
    "fuzz": {"config": 4000, "config file": 2000, "weights": 3000, "training": 60},
}
for name, counts in EXAMPLES.items():
    settings.register_profile(
        name,
        max_examples=counts["config"],
        deadline=None,  # shared CI cores: each command has its own time limit instead (TIME_LIMIT)
        database=None,  # no .hypothesis/ folder in the checkout
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "fast")
FUZZ, BUDGET = settings.get_profile(PROFILE), EXAMPLES[PROFILE]
TIME_LIMIT = {"validate": 30.0, "train": 180.0}  # seconds one command may take before it is a hang
COUNTS_FILE = "MNIST_DIST_FUZZ_COUNTS"
COUNTS: Counter[str] = Counter()

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
HINTS = get_type_hints(TrainConfig)
CHOICES = sorted({*PRESETS, *MODELS, *PRECISIONS, *OPTIMIZERS, *INTERPOLATIONS, *WANDB_MODES})
INPUTS = "@INPUTS@"  # stands for the example's own folder of input files (made after the draw)


# ---------------------------------------------------------------------- running the command
class Hang(Exception):
    """A command that did not answer within its time limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """SIGALRM interrupts a command that hangs, and the example fails with Hang instead of waiting."""

    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def sandbox() -> Iterator[tuple[Path, Path]]:
    """(work, inputs): an empty working directory to run in, which a refusal must leave empty,
    and a folder beside it for the files the example hands the command."""
    with tempfile.TemporaryDirectory() as tmp:
        work, inputs = Path(tmp) / "work", Path(tmp) / "inputs"
        work.mkdir()
        inputs.mkdir()
        (inputs / "a-file").write_text("not a folder\n")
        before = Path.cwd()
        os.chdir(work)
        try:
            yield work, inputs
        finally:
            os.chdir(before)


def invoke(args: list[str], limit: float, crashed: str) -> Result:
    """The command in this process, with a fresh Accelerate state; any exception but an exit is a
    crash, counted under ``crashed`` and failed with its traceback. A run's process-wide torch
    settings (threads, deterministic kernels) are put back for the tests after it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        with time_limit(limit):
            result = CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        COUNTS[crashed] += 1
        raise AssertionError(
            f"mnist-dist {args!r} crashed:\n{''.join(traceback.format_exception(*result.exc_info))}"
        )
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak  # KiB
    assert grown < 1024**2, f"mnist-dist {args!r} allocated {grown / 1024**2:.1f} GiB"
    return result


def assert_refused(result: Result, names: list[str], work: Path) -> None:
    """Exit 2, one error message naming one of ``names``, no traceback, nothing left in ``work``."""
    text = flat(result.output)
    assert result.exit_code == 2, f"exit {result.exit_code}: {text}"
    assert len(re.findall(r"^Error: |─ Error ─", result.output, re.M)) == 1, result.output
    assert "Traceback" not in result.output
    assert any(n in text for n in names), f"the refusal names none of {names}: {text}"
    assert not any(work.iterdir()), f"a refusal left {sorted(p.name for p in work.iterdir())} behind"


@pytest.fixture(scope="module", autouse=True)
def tiny_digits(digits: D.MNISTArrays) -> Iterator[D.MNISTArrays]:
    """The MNIST files replaced by a few hundred synthetic digits (500 train, 100 validation, 100
    test), for every command of this module."""
    tiny = D.MNISTArrays(
        digits.train_images[:600],
        digits.train_labels[:600],
        digits.test_images[:100],
        digits.test_labels[:100],
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(D, "load_mnist", lambda root, allow_download=True: tiny)
        # CliRunner builds the app's click command anew for every call (most of a refusal's time):
        # build it once, as the real command does once per process.
        patch.setattr(typer.testing, "_get_command", functools.cache(typer.testing._get_command))
        yield tiny


@pytest.fixture(scope="module", autouse=True)
def write_counts() -> Iterator[None]:
    yield
    if os.environ.get(COUNTS_FILE):
        Path(os.environ[COUNTS_FILE]).write_text(json.dumps(dict(sorted(COUNTS.items())), indent=2) + "\n")


# ---------------------------------------------------------------------- config values
HUGE = st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**30, 10**400, -(2**63), -(10**30)])
ODD_TEXT = st.sampled_from(
    ["", " ", "\x00", "a\x00b", "\ud800", "x\udcff", "é" * 200, "a" * 300, ".", "..", "../up", "-", "--epochs",
     "a/b", "/", "/proc/forbidden", "nan", "-inf", "1e3", "\uff11\uff12", "1_000", "0x10", " 7 ", "None", "null", "true"]
)  # fmt: skip
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE, st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 5e-324, 1e308]),
    st.text(max_size=20), ODD_TEXT, st.sampled_from(CHOICES),
)  # fmt: skip
ANY = st.one_of(
    SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=5), SCALARS, max_size=2)
)
NEAR = {  # values of each type near (and on both sides of) what the fields allow
    int: st.integers(-2, 600) | st.sampled_from([2**31 - 1, 2**32 - 1, 2**32]),
    float: st.floats(-1, 200)
    | st.sampled_from([0.0, 1.0, 1e-12, 1e-300, 0.999999, 14.0, 100.0, 180.0, 1e30, 1e39]),
    str: st.sampled_from(CHOICES) | st.text(max_size=12) | st.just(INPUTS),
    bool: st.booleans(),
    type(None): st.none(),
}


def near(name: str) -> st.SearchStrategy[Any]:
    """A field's values from its type hint: a new field of a known type is fuzzed with no edit here."""
    hint = HINTS[name]
    return st.one_of([NEAR[kind] for kind in get_args(hint) or (hint,)])


def wild(name: str) -> st.SearchStrategy[Any]:
    return near(name) | ANY


@st.composite
def recipes(draw: st.DrawFn, value: Callable[[str], st.SearchStrategy[Any]] = wild) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True))
    return {name: draw(value(name)) for name in names}


BASE = {
    "output_dir": "runs",
    "name": "run",
    "wandb": "disabled",
    "threads": 1,
    "epochs": 1,
    "max_train_samples": 256,
    "compile": False,  # torch.compile takes a minute: the trained examples run eager
}


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def placed(value: Any, inputs: Path) -> Any:
    return value.replace(INPUTS, str(inputs)) if isinstance(value, str) else value


def shown(value: Any) -> str:
    """A value as a user types it after its option."""
    if isinstance(value, str):
        return value
    if isinstance(value, float | int) and not isinstance(value, bool):
        return repr(value)
    return json.dumps(value)


def option(name: str, value: Any) -> list[str]:
    if option_type(HINTS[name]) is bool and isinstance(value, bool):
        return [flag(name) if value else f"--no-{flag(name)[2:]}"]
    if option_type(HINTS[name]) is bool:
        return [f"{flag(name)}={shown(value)}"]  # a flag given a value
    return [flag(name), shown(value)]


def command(values: dict[str, Any], via_file: bool, inputs: Path) -> tuple[list[str], list[str]]:
    """(args of `mnist-dist train`, the words a refusal may name) for the recipe ``values`` over
    BASE, given as options or as a --config file."""
    recipe = {k: placed(v, inputs) for k, v in {**BASE, **values}.items()}
    names = [flag(k) for k in recipe] + [v for v in recipe.values() if isinstance(v, str) and len(v) > 2]
    if not via_file:
        return ["train", *(a for k, v in recipe.items() for a in option(k, v))], names
    path = inputs / "config.json"
    path.write_text(json.dumps(recipe))
    return ["train", "--config", str(path)], [*names, *(repr(k) for k in recipe), str(path)]


def validated(
    values: dict[str, Any], via_file: bool, work: Path, inputs: Path, test: str
) -> TrainConfig | None:
    """The config `train --print-config` resolves from ``values``, checked to be one a --config file
    gives back unchanged; None (checked as a clean refusal) when it is refused."""
    args, names = command(values, via_file, inputs)
    result = invoke([*args, "--print-config"], TIME_LIMIT["validate"], f"{test}: crashed")
    if result.exit_code != 0:
        COUNTS[f"{test}: refused"] += 1
        assert_refused(result, names, work)
        return None
    COUNTS[f"{test}: validated"] += 1
    printed = json.loads(result.stdout)
    cfg = TrainConfig.from_dict(printed).validate()
    assert cfg.to_dict() == printed and not any(work.iterdir())
    return cfg


# Regression examples: each crashed (a traceback, or a segfault for the huge batch) before the fix.
@example(values={"seed": -1}, via_file=False)
@example(values={"seed": 10**30}, via_file=True)
@example(values={"split_seed": 10**30}, via_file=False)
@example(values={"eval_batch_size": 2**63 - 1}, via_file=False)
@example(values={"threads": 2**31}, via_file=True)
@example(values={"name": "a\x00b"}, via_file=True)
@example(values={"output_dir": "x\ud800"}, via_file=True)
@example(values={"max_lr": math.inf}, via_file=True)
@example(values={"data_dir": "9" * 300}, via_file=False)
@example(values={"lr": 10**400}, via_file=True)
@given(values=recipes(), via_file=st.booleans())
@settings(FUZZ)
def test_any_value_of_any_field_is_refused_by_name_or_validated(
    values: dict[str, Any], via_file: bool
) -> None:
    for name in values:
        COUNTS[f"config: field {name}"] += 1
    with sandbox() as (work, inputs):
        validated(values, via_file, work, inputs, "config")


# ---------------------------------------------------------------------- recipes trained for real
SAMPLES = 256  # the most training samples of a trained example: with these bounds, <= 32 steps
PLAIN_NAME = st.text(
    st.characters(exclude_characters="/\x00", exclude_categories=("Cs",)), min_size=1, max_size=12
)
TRAIN_BOUNDS = {
    # The fields that set how long a run takes draw only cheap valid values here (and invalid ones,
    # refused at once); test_any_value_of_any_field_... validates their costly values (epochs
    # 10**6, a million samples, torch.compile, a wandb run) without training them.
    "epochs": st.integers(-1, 2),
    "max_train_samples": st.integers(-1, SAMPLES),
    "batch_size": st.integers(-1, 0) | st.integers(16, SAMPLES) | st.sampled_from([2**31 - 1, 2**31]),
    "global_batch_size": st.none() | st.integers(-1, 0) | st.integers(16, 2 * SAMPLES),
    "grad_accum": st.integers(-1, 3),
    "eval_batch_size": st.integers(-1, 0) | st.integers(16, 4096) | st.sampled_from([2**31 - 1, 2**63 - 1]),
    "threads": st.sampled_from([-1, 0, 1, 2**31]),  # more would change this test process's threads
    "compile": st.just(False),
    "wandb": st.sampled_from(["disabled", "Disabled", "off", ""]),
    # Paths stay inside the example's folders, or are ones no run can use.
    "output_dir": PLAIN_NAME
    | st.sampled_from(["a/b", "é" * 200, "a" * 300, f"{INPUTS}/a-file", "/proc/forbidden"]),
    "name": PLAIN_NAME | st.sampled_from(["", ".", "..", "a/b", "é" * 200, "a\x00b"]),
    "data_dir": st.none() | st.sampled_from([INPUTS, f"{INPUTS}/nope", f"{INPUTS}/a-file"]),
    "resume": st.none() | st.sampled_from(["auto", "AUTO", INPUTS, f"{INPUTS}/nope"]),
}
assert TRAIN_BOUNDS.keys() <= set(FIELDS), "a bounded field is no longer a config field"


def bounded(name: str) -> st.SearchStrategy[Any]:
    return TRAIN_BOUNDS[name] if name in TRAIN_BOUNDS else near(name)


def run_folder(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / (cfg.name or "")


# Regression examples: a refusal that left an empty run folder, and a traceback, before the fix.
@example(values={"resume": INPUTS}, via_file=False)
@example(values={"output_dir": "a" * 300}, via_file=True)
@example(values={"final_div_factor": 1e-300}, via_file=False)  # an end LR past float32: a crash in Adam
# A recipe that trains whatever the draw: odd but valid values of many fields at once.
@example(
    values={"preset": "reference", "model": "net_wide", "batch_size": 100, "grad_accum": 2,
            "checkpoint_every": 1, "keep_checkpoints": 1, "eval_batch_size": 2**31 - 1, "seed": 2**32 - 1,
            "name": "é" * 100, "optimizer": "sgd", "label_smoothing": 0.9, "ema": 0.5, "scale": 0.5,
            "rotate": 180.0, "elastic": 100.0, "log_every": 2**31 - 1, "deterministic": True},
    via_file=True,
)  # fmt: skip
@given(values=recipes(bounded), via_file=st.booleans())
@settings(FUZZ, max_examples=BUDGET["training"])
def test_a_bounded_recipe_trains_or_is_refused_by_name(values: dict[str, Any], via_file: bool) -> None:
    with sandbox() as (work, inputs):
        cfg = validated(values, via_file, work, inputs, "training")
        if cfg is None:
            return
        assert cfg.epochs * cfg.steps_per_epoch(1) <= 2 * SAMPLES // 16, "a bound of TRAIN_BOUNDS is off"
        args, names = command(values, via_file, inputs)
        result = invoke(args, TIME_LIMIT["train"], "training: crashed")
        if result.exit_code == 2:  # refused where the run starts (its folder cannot be made)
            COUNTS["training: refused when starting"] += 1
            assert_refused(result, names, work)
            return
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        if result.exit_code == DIVERGED_EXIT:  # --max-lr 150: the loss goes NaN, nothing is saved
            COUNTS["training: diverged (exit 65)"] += 1
            assert len(errors) == 1 and "NaN or inf" in errors[0], result.output
            assert not list(Path(cfg.output_dir).rglob(runfiles.WEIGHTS_FILE))
            return
        assert result.exit_code == 0, result.output
        COUNTS["training: trained"] += 1
        folders = [run_folder(cfg)] if cfg.name else list(Path(cfg.output_dir).iterdir())
        assert len(folders) == 1 and (folders[0] / runfiles.WEIGHTS_FILE).is_file(), result.output


# ---------------------------------------------------------------------- config files
@example(content=b"\xff\xfe{}")
@example(content=b"[" * 100_000)
@example(content=b'{"epochs": ' + b"9" * 5000 + b"}")
@given(
    content=st.binary(max_size=64)
    | st.text(max_size=64).map(str.encode)
    | st.recursive(
        SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner)
    ).map(lambda obj: json.dumps(obj).encode())
)
@settings(FUZZ, max_examples=BUDGET["config file"])
def test_any_config_file_is_refused_by_name_or_validated(content: bytes) -> None:
    with sandbox() as (work, inputs):
        path = inputs / "config.json"
        path.write_bytes(content)
        args = ["train", "--config", str(path), "--print-config"]
        result = invoke(args, TIME_LIMIT["validate"], "config file: crashed")
        if result.exit_code == 0:
            COUNTS["config file: validated"] += 1
            return
        COUNTS["config file: refused"] += 1
        assert_refused(result, [str(path), "'", "--"], work)


# ---------------------------------------------------------------------- weights files
STATES = {name: build_model(name).state_dict() for name in MODELS}
KEYS = sorted({k for state in STATES.values() for k in state})
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F99", "", "float32"]
TORCH_DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
]


@st.composite
def handmade_safetensors(draw: st.DrawFn) -> bytes:
    """A safetensors file written byte by byte, so that every part can lie: the header's length,
    its JSON, each tensor's dtype, shape and offsets, and how much data follows."""
    entries: dict[str, Any] = {}
    offset = 0
    for key in draw(st.lists(st.sampled_from(KEYS) | st.text(max_size=8), max_size=4, unique=True)):
        shape = draw(st.lists(st.integers(0, 6) | st.sampled_from([-1, 2**40, 2**63]), max_size=4))
        size = 4 * math.prod(shape)
        honest = [offset, offset + size]
        offsets = draw(st.just(honest) | st.lists(st.integers(-1, 2**64), max_size=3))
        entries[key] = {"dtype": draw(st.sampled_from(DTYPES)), "shape": shape, "data_offsets": offsets}
        offset += max(size, 0)
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))
    header = json.dumps(draw(st.just(entries) | ANY)).encode()
    declared = draw(st.just(len(header)) | st.integers(0, 2**64 - 1))
    data = draw(st.binary(max_size=64) | st.just(bytes(min(offset, 2**16))))
    return struct.pack("<Q", declared) + header + data


@st.composite
def mutated_model(draw: st.DrawFn) -> bytes:
    """A real model's safetensors with keys dropped, added or renamed, dtypes and shapes changed,
    then cut short or with bytes overwritten anywhere (header included)."""
    state = dict(STATES[draw(st.sampled_from(sorted(MODELS)))])
    for key in draw(st.lists(st.sampled_from(sorted(state)), max_size=3, unique=True)):
        change = draw(st.sampled_from(["drop", "dtype", "shape", "rename"]))
        tensor = state.pop(key)
        if change == "dtype":
            state[key] = tensor.to(draw(st.sampled_from(TORCH_DTYPES)))
        elif change == "shape":
            state[key] = tensor.reshape(-1) if tensor.dim() else torch.zeros(2, 3)
        elif change == "rename":
            state[draw(st.sampled_from(["module." + key, key + "x", "_orig_mod.module." + key]))] = tensor
    blob = bytearray(safetensors_bytes({k: v.contiguous() for k, v in state.items()}))
    for at, byte in draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)), max_size=3)):
        blob[at] = byte
    return bytes(blob[: draw(st.integers(0, len(blob)) | st.just(len(blob)))])


def torch_saved(obj: Any, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


PICKLED = st.recursive(
    SCALARS | st.builds(torch.zeros, st.lists(st.integers(0, 3), max_size=3).map(tuple)),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner)
    ),
    max_leaves=6,
)
EVIL = "@EVIL@"  # stands for a pickle that runs a shell command when unpickled unsafely


@st.composite
def pickles(draw: st.DrawFn) -> bytes | str:
    """torch.save of arbitrary objects (new and legacy format), raw pickles, and ones that would run
    code (helpers.RunsCode) if anything unpickled them unsafely."""
    if draw(st.booleans()):
        return EVIL
    obj = draw(PICKLED | st.sampled_from(sorted(MODELS)).map(lambda m: dict(STATES[m])))
    how = draw(st.sampled_from(["torch", "legacy", "pickle"]))
    if how == "pickle":
        return pickle.dumps(obj, protocol=draw(st.integers(0, pickle.HIGHEST_PROTOCOL)))
    return torch_saved(obj, legacy=how == "legacy")


_HEADER = b'{"a": {"dtype": "F32", "shape": [0, 9223372036854775808], "data_offsets": [0, 0]}}'
OVERFLOWING_SHAPE = struct.pack("<Q", len(_HEADER)) + _HEADER  # torch cannot even hold the shape
SPECIAL = ["empty folder", "run folder", "fifo", "zero device", "dangling link", "folder named .safetensors"]
SUFFIXES = [".safetensors", ".pt", ".pth", ".bin", ""]


def evil(sentinel: Path, how: str) -> bytes:
    payload = {"convblock1.0.weight": RunsCode(sentinel)}
    return pickle.dumps(payload) if how == "pickle" else torch_saved(payload, legacy=how == "legacy")


def write_weights(inputs: Path, content: bytes | str, suffix: str, sentinel: Path) -> Path:
    """Where ``content`` lies as the weights argument: a file of its bytes, or a SPECIAL thing."""
    path = inputs / f"weights{suffix}"
    if content == EVIL:
        path.write_bytes(evil(sentinel, {".pt": "torch", ".bin": "legacy"}.get(suffix, "pickle")))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "fifo":
        os.mkfifo(path)
    elif content == "zero device":
        path.symlink_to("/dev/zero")
    elif content == "dangling link":
        path.symlink_to(inputs / "nowhere")
    elif content == "folder named .safetensors":
        (path := inputs / "folder.safetensors").mkdir()
    else:  # a folder: empty, or a run folder whose config.json and weights are both cut short
        (path := inputs / "run").mkdir()
        if content == "run folder":
            (path / runfiles.WEIGHTS_FILE).write_bytes(safetensors_bytes(dict(STATES["net"]))[:-7])
            (path / runfiles.CONFIG_FILE).write_text('{"model": "net", ')
    return path


WEIGHTS = st.one_of(
    st.binary(max_size=256), handmade_safetensors(), mutated_model(), pickles(), st.sampled_from(SPECIAL)
)


def weights_command(verb: str, path: Path, inputs: Path) -> list[str]:
    if verb == "predict":
        digit = Image.new("L", (28, 28), 255)
        digit.paste(0, (11, 5, 17, 23))  # a dark bar on white: a 1
        digit.save(inputs / "digit.png")
        return ["predict", str(path), str(inputs / "digit.png")]
    if verb == "export":
        return [
            "export",
            str(path),
            "--format",
            "torchscript",
            "--out",
            str(inputs / "out.pt"),
            "--data-dir",
            str(inputs),
        ]
    return ["evaluate", str(path), "--data-dir", str(inputs)]


# Regression examples: a traceback before the fix (a shape past 64 bits, a malformed pickle stream).
@example(content=OVERFLOWING_SHAPE, suffix=".safetensors", verb="evaluate")
@example(content=b"e", suffix=".pt", verb="evaluate")
@example(content=b"", suffix=".safetensors", verb="evaluate")
@example(content=EVIL, suffix=".pt", verb="evaluate")
@example(content="fifo", suffix=".pt", verb="predict")
@given(
    content=WEIGHTS,
    suffix=st.sampled_from(SUFFIXES),
    verb=st.sampled_from(["evaluate", "evaluate", "predict", "export"]),
)
@settings(FUZZ, max_examples=BUDGET["weights"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the fuzz's own pickles
def test_any_weights_file_is_refused_by_name_or_loaded(content: bytes | str, suffix: str, verb: str) -> None:
    with sandbox() as (work, inputs):
        sentinel = inputs / "code-ran"
        path = write_weights(inputs, content, suffix, sentinel)
        result = invoke(weights_command(verb, path, inputs), TIME_LIMIT["validate"], "weights: crashed")
        assert not sentinel.exists(), "unpickling the weights ran their code"
        if result.exit_code == 0:  # a mutation that left a loadable model (its numbers changed)
            COUNTS[f"weights: {verb} accepted"] += 1
            return
        COUNTS[f"weights: {verb} refused"] += 1
        assert_refused(result, [str(path)], work)


def test_a_weights_path_that_is_no_file_is_named_for_what_it_is(tmp_path: Path) -> None:
    """A pipe exists but holds no weights (and would block a reader forever): it used to be called
    missing."""
    os.mkfifo(tmp_path / "w.pt")
    result = invoke(["evaluate", str(tmp_path / "w.pt")], TIME_LIMIT["validate"], "weights: crashed")
    assert result.exit_code == 2 and "w.pt is not a regular file" in result.output, result.output
