"""Distillation (--distill-from) in-process, on synthetic digits: a tiny teacher run teaches a student
of the same recipe, which reports its teachers and resumes to the uninterrupted weights; the soft loss
against hand computations and its gradients; every refusal through the CLI, with no run folder left;
and without teachers, the loss of before."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState
from typer.testing import CliRunner

from mnist_dist import data as D
from mnist_dist import runfiles
from mnist_dist import trainer as T
from mnist_dist.cli import app
from mnist_dist.config import TrainConfig
from mnist_dist.distill import Teacher, Teachers, soft_loss
from mnist_dist.model import build_model, count_parameters
from mnist_dist.preemption import Preempted

from .test_cli import flat
from .test_trainer import SignalAt, config, records, weights

RECIPE = {"max_train_samples": 1024}  # reference preset, 2 epochs of 8 steps (tests/test_trainer.config)


class Keep(T.Hooks):
    """The trainer itself, and the student's weights before its first step."""

    def on_step(self, trainer: T.Trainer, micro_batches: list[torch.Tensor]) -> None:
        if trainer.state.global_step == 0:
            self.init = {k: v.clone() for k, v in trainer.net.state_dict().items()}

    def on_finish(self, trainer: T.Trainer, summary: dict[str, Any]) -> None:
        self.trainer = trainer


def trained(cfg: TrainConfig, data: D.MNISTArrays, *hooks: T.Hooks) -> dict[str, Any]:
    AcceleratorState._reset_state(reset_partial_state=True)  # module-scoped runs, outside the autouse reset
    return T.train(cfg, data=data, hooks=hooks)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, digits: D.MNISTArrays) -> tuple[Path, Keep]:
    tmp, kept = tmp_path_factory.mktemp("teacher"), Keep()
    trained(config(tmp, "teacher", **RECIPE), digits, kept)
    return tmp / "teacher", kept


@pytest.fixture(scope="module")
def student(
    tmp_path_factory: pytest.TempPathFactory, digits: D.MNISTArrays, teacher: tuple[Path, Keep]
) -> tuple[Path, dict[str, Any], Keep]:
    """The teacher's recipe and seed, taught by it and by a copy of its run (named by its folder and by
    a weights file: both forms of a teacher)."""
    tmp, kept = tmp_path_factory.mktemp("student"), Keep()
    shutil.copytree(teacher[0], tmp / "copy")
    teachers = f"{teacher[0]},{tmp / 'copy' / runfiles.WEIGHTS_FILE}"
    summary = trained(config(tmp, "student", distill_from=teachers, log_every=1, **RECIPE), digits, kept)
    return tmp / "student", summary, kept


def test_a_distilled_student_trains_and_reports_its_teachers(
    student: tuple[Path, dict[str, Any], Keep], teacher: tuple[Path, Keep]
) -> None:
    run_dir, summary, kept = student
    teacher_summary = runfiles.read_summary(teacher[0])
    assert summary["distill_from"] == [str(teacher[0]), str(run_dir.parent / "copy" / runfiles.WEIGHTS_FILE)]
    assert summary["teacher_train_seconds"] == 2 * teacher_summary["train_seconds"]
    assert summary["teacher_params"] == 2 * count_parameters(build_model("net"))
    saved = runfiles.read_summary(run_dir)
    assert {k: saved[k] for k in ("distill_from", "teacher_train_seconds", "teacher_params")} == {
        k: summary[k] for k in ("distill_from", "teacher_train_seconds", "teacher_params")
    }
    assert summary["val_acc"] > 0.2  # it learned (chance: 0.1; 16 steps)
    # Loading the teachers draws no random number of the student's: the same init as the teacher's run.
    assert all(torch.equal(kept.init[k], v) for k, v in teacher[1].init.items())
    # The soft loss acts: the same recipe and seed ends elsewhere than the teacher, which had none.
    mine, its = weights(run_dir), weights(teacher[0])
    assert any(not torch.equal(mine[k], its[k]) for k in its)
    assert all(not t.net.training for t in kept.trainer.teachers.teachers)


def test_the_start_line_names_the_teachers(
    tmp_path: Path, digits: D.MNISTArrays, teacher: tuple[Path, Keep], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, "s", distill_from=str(teacher[0]), distill_temperature=2.0, epochs=1, **RECIPE)
    T.Trainer(cfg, data=digits).close()
    assert (
        f"distilling from 1 teacher(s): {teacher[0]} (net); temperature 2, weight 0.5"
        in capsys.readouterr().out
    )


def test_the_soft_loss_is_t_squared_times_the_kl_divergence() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    for temperature in (1.0, 4.0):
        p = torch.softmax(teacher / temperature, dim=1)
        log_q = torch.log_softmax(student / temperature, dim=1)
        by_hand = temperature**2 * (p * (p.log() - log_q)).sum()
        assert torch.allclose(soft_loss(student, p, temperature), by_hand, rtol=1e-5)
        assert by_hand > 0.1
        # log_softmax outputs are logits shifted per row, so T softens them like the logits.
        assert torch.allclose(torch.softmax(torch.log_softmax(teacher, 1) / temperature, 1), p, atol=1e-6)
        same = soft_loss(torch.log_softmax(teacher, 1), p, temperature)
        assert abs(same.item()) < 1e-5


def loss_and_grads(net: torch.nn.Module, teachers: Teachers, x: torch.Tensor, y: torch.Tensor) -> Any:
    net.zero_grad()
    out = net(x)
    loss = teachers.loss(F.nll_loss(out, y, reduction="sum"), out, x)
    loss.backward()
    return loss, torch.cat([p.grad.flatten() for p in net.parameters()])


def test_a_teacher_equal_to_the_student_gives_no_soft_gradient(
    tmp_path: Path, digits: D.MNISTArrays, teacher: tuple[Path, Keep]
) -> None:
    """Weight 1, T = 1, the student's own copy as teacher: the loss and every gradient vanish; with
    weight 0.5 the gradient is half the label loss's; another teacher pulls the student away."""
    torch.manual_seed(0)
    net = build_model("net").eval()
    x, y = digits.train_images[:64, None].float() / 255, digits.train_labels[:64]
    itself = [Teacher("itself", build_model("net").eval(), "net", 0.0)]
    itself[0].net.load_state_dict(net.state_dict())
    loss, grads = loss_and_grads(net, Teachers(itself, 1.0, 1.0), x, y)
    assert abs(loss.item()) < 1e-4 and grads.abs().max() < 1e-5
    _, half = loss_and_grads(net, Teachers(itself, 1.0, 0.5), x, y)
    net.zero_grad()
    F.nll_loss(net(x), y, reduction="sum").backward()
    hard = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert torch.allclose(half, hard / 2, atol=1e-4) and hard.abs().max() > 1e-2
    cfg = config(tmp_path, "x", distill_from=str(teacher[0]), distill_weight=1.0, distill_temperature=1.0)
    _, pulled = loss_and_grads(net, Teachers.load(cfg, torch.device("cpu")), x, y)
    assert pulled.abs().max() > 1e-2


def test_a_student_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, digits: D.MNISTArrays, student: tuple[Path, dict[str, Any], Keep]
) -> None:
    """The student's run stopped by SIGTERM at step 11 (mid-epoch 2), then --resume auto: the teachers
    load again from the paths the config carries, and the weights and every logged loss equal the
    uninterrupted run's."""
    cfg = student[2].trainer.cfg.replace(output_dir=str(tmp_path), name="cut")
    with pytest.raises(Preempted):
        trained(cfg, digits, SignalAt(11, signal.SIGTERM))
    trained(cfg.replace(resume="auto"), digits)
    ref, cut = weights(student[0]), weights(tmp_path / "cut")
    assert all(torch.equal(ref[k], cut[k]) for k in ref), "final weights differ"
    logged = [
        [(r["step"], r["train/loss"]) for r in records(d, "step")] for d in (student[0], tmp_path / "cut")
    ]
    assert logged[0] == logged[1] and len(logged[0]) == 16


def test_without_teachers_the_loss_is_the_label_loss_exactly(teacher: tuple[Path, Keep]) -> None:
    trainer = teacher[1].trainer
    assert trainer.teachers is None
    assert (
        not {"distill_from", "teacher_train_seconds", "teacher_params"}
        & runfiles.read_summary(teacher[0]).keys()
    )
    g = torch.Generator().manual_seed(1)
    out, y = torch.log_softmax(torch.randn(32, 10, generator=g), 1), torch.randint(0, 10, (32,), generator=g)
    x = torch.rand(32, 1, 28, 28, generator=g)
    assert torch.equal(trainer.loss(out, y, x), F.nll_loss(out, y, reduction="sum"))
    trainer.cfg = trainer.cfg.replace(label_smoothing=0.1)
    smoothed = F.cross_entropy(out, y, label_smoothing=0.1, reduction="sum")
    assert torch.equal(trainer.loss(out, y, x), smoothed)


# ---------------------------------------------------------------------- refusals
@pytest.fixture
def cli_digits(digits: D.MNISTArrays, monkeypatch: pytest.MonkeyPatch) -> None:
    """The MNIST files replaced by the synthetic digits for the CLI's commands."""
    monkeypatch.setattr(D, "load_mnist", lambda root, allow_download=True: digits)


def copied_run(teacher: Path, to: Path, drop: str | None = None, **config: Any) -> Path:
    """A copy of the teacher's run folder, without the file ``drop``, its config.json changed."""
    shutil.copytree(teacher, to)
    if drop:
        (to / drop).unlink()
    saved = runfiles.read_config(to)
    (to / runfiles.CONFIG_FILE).write_text(json.dumps({**saved, **config}))
    return to


def teacher_at(make: Any) -> Any:
    """Arguments naming one teacher, made by ``make(teacher run, tmp)``: refused naming its path."""

    def args(t: Path, tmp: Path) -> tuple[list[str], str]:
        path = str(make(t, tmp))
        return ["--distill-from", path], path

    return args


# case: (arguments and the path the refusal names, from the teacher run and tmp; the flag; words of it)
REFUSALS = {
    "missing path": (teacher_at(lambda t, tmp: tmp / "nope"), "--distill-from", "does not exist"),
    "not weights": (teacher_at(lambda t, tmp: tmp / "junk.safetensors"), "--distill-from", "not a readable"),
    "another split": (
        teacher_at(lambda t, tmp: copied_run(t, tmp / "split1", split_seed=1)),
        "--distill-from",
        "split seed 1",
    ),
    "bare weights file": (
        teacher_at(lambda t, tmp: tmp / "bare.safetensors"),
        "--distill-from",
        "config.json",
    ),
    "unfinished run": (
        teacher_at(lambda t, tmp: copied_run(t, tmp / "unfinished", runfiles.SUMMARY_FILE)),
        "--distill-from",
        "summary.json",
    ),
    "empty entry": (lambda t, tmp: (["--distill-from", f"{t},"], f"{t},"), "--distill-from", "empty entry"),
    "one teacher twice": (
        lambda t, tmp: (
            ["--distill-from", f"{t},{t / runfiles.WEIGHTS_FILE}"],
            str(t / runfiles.WEIGHTS_FILE),
        ),
        "--distill-from",
        "twice",
    ),
    "temperature 0": (
        lambda t, tmp: (["--distill-from", str(t), "--distill-temperature", "0"], "0.0"),
        "--distill-temperature",
        "> 0",
    ),
    "temperature whose square overflows": (
        lambda t, tmp: (["--distill-from", str(t), "--distill-temperature", "1e20"], "1e+20"),
        "--distill-temperature",
        "float32",
    ),
    "weight 0": (
        lambda t, tmp: (["--distill-from", str(t), "--distill-weight", "0"], "0.0"),
        "--distill-weight",
        "(0, 1]",
    ),
    "weight 1.5": (
        lambda t, tmp: (["--distill-from", str(t), "--distill-weight", "1.5"], "1.5"),
        "--distill-weight",
        "(0, 1]",
    ),
    "temperature alone": (
        lambda t, tmp: (["--distill-temperature", "2"], "2.0"),
        "--distill-temperature",
        "--distill-from",
    ),
}


# How the refusal is reached: a one-process run, the config printed, two ranks to launch, a sweep.
MODES = {
    "train": ["train", "--threads", "1"],
    "print-config": ["train", "--threads", "1", "--print-config"],
    "two ranks": ["train", "--threads", "1", "--processes", "2"],
    "sweep": ["sweep", "--seeds", "1,2"],
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", REFUSALS)
def test_bad_teachers_and_knobs_are_refused_by_name_with_no_run_folder(
    tmp_path: Path, teacher: tuple[Path, Keep], cli_digits: None, case: str, mode: str
) -> None:
    """Exit 2, one line naming the flag, the bad value and what is allowed; no run folder, nothing
    printed, no rank or seed started: the command checks the teachers as it validates the config."""
    (tmp_path / "junk.safetensors").write_bytes(b"not weights at all")
    shutil.copy(teacher[0] / runfiles.WEIGHTS_FILE, tmp_path / "bare.safetensors")
    make, flag, words = REFUSALS[case]
    args, value = make(teacher[0], tmp_path)
    result = CliRunner().invoke(
        app, [*MODES[mode], "--output-dir", str(tmp_path / "runs"), "--name", "s", "--wandb", "disabled",
              "--max-train-samples", "256", "--epochs", "1", *args],
    )  # fmt: skip
    text = flat(result.output)
    assert result.exit_code == 2, text
    assert text.count("Error: ") == 1 and "Traceback" not in text, text
    assert all(w in text for w in (flag, value, words)), text
    assert result.stdout == "" and not (tmp_path / "runs").exists()
