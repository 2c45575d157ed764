"""--branches: four conv + BatchNorm branches per 3x3 block while training, folded exactly into the
plain Net afterwards. The fold is checked on a model whose BatchNorm statistics real training steps
moved, and end to end: the run saves the plain model, reports its accuracy, and resumes bit-exactly."""

from __future__ import annotations

import copy
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState

from mnist_dist import data as D
from mnist_dist import runfiles
from mnist_dist import trainer as T
from mnist_dist.branches import Branches, branched, fold
from mnist_dist.config import ConfigError
from mnist_dist.evaluate import accuracy
from mnist_dist.model import MODELS, build_model, count_parameters
from mnist_dist.preemption import Preempted
from mnist_dist.weights import infer_model, load_model, load_state_dict

from .test_trainer import SignalAt, config, records, run, weights

# Folded against branched outputs in eval mode, float32: probabilities within 1e-5, log-probabilities
# within 1e-5 of their size (a log-probability of -37 is held in steps of 3.8e-6).
TOLERANCE = 1e-5
TOLERANCE_64 = 1e-10  # the same in float64: what is left of it is rounding, not the fold
PLAIN_PARAMS = {"net": 8_440, "net_wider": 19_616}
BRANCHED = {"branches": True, "ema": 0.9, "log_every": 3, "checkpoint_every": 5}  # on the reference preset


def trained(model: str, arrays: D.MNISTArrays, channels_last: bool, steps: int = 5) -> torch.nn.Module:
    """A branched model after a few Adam steps in train mode: its BatchNorm statistics have moved."""
    torch.manual_seed(0)
    net = branched(build_model(model))
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for i in range(steps):
        x = D.normalize(arrays.train_images[i * 64 : (i + 1) * 64].unsqueeze(1))
        loss = F.nll_loss(net(x), arrays.train_labels[i * 64 : (i + 1) * 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def assert_folds_exactly(net: torch.nn.Module, images: torch.Tensor) -> None:
    """Within float32 rounding of the outputs, and exact to float64's rounding in float64."""
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plain, net64 = fold(net), copy.deepcopy(net).double()
    x = D.normalize(images.unsqueeze(1))
    with torch.no_grad():
        folded, branched_out = plain.eval()(x), net(x)
        difference = (folded.exp() - branched_out.exp()).abs().max().item()
        relative = ((folded - branched_out).abs() / branched_out.abs().clamp_min(1)).max().item()
        x64 = x[:8].double()  # torch's float64 convolutions are slow: a few images suffice
        difference64 = (fold(net64).eval()(x64) - net64(x64)).abs().max().item()
    assert difference <= TOLERANCE, difference
    assert relative <= TOLERANCE, relative
    assert difference64 <= TOLERANCE_64, difference64
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "fold changed its input"
    assert not any(isinstance(m, Branches) for m in plain.modules())


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("model", PLAIN_PARAMS)
def test_the_folded_model_computes_the_branched_ones_outputs(
    digits: D.MNISTArrays, model: str, channels_last: bool
) -> None:
    net = trained(model, digits, channels_last)
    bn = net.convblock3[0]["k1x3"].bn  # a new branch's statistics, far from their start (0, 1)
    assert (bn.running_mean.abs().max() > 0.1) and ((bn.running_var - 1).abs().max() > 0.1)
    assert_folds_exactly(net, digits.test_images[:500])
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert fold(net).convblock2[0].weight.is_contiguous(memory_format=layout)  # the layout it trained in


@pytest.mark.proof
@pytest.mark.parametrize("model", PLAIN_PARAMS)
def test_the_fold_is_exact_on_real_digits(mnist: D.MNISTArrays, model: str) -> None:
    assert_folds_exactly(trained(model, mnist, channels_last=True), mnist.test_images[:2_000])


@pytest.mark.parametrize("model", MODELS)
def test_the_folded_model_is_the_plain_one(model: str) -> None:
    plain, net = build_model(model), branched(build_model(model))
    assert count_parameters(net) > count_parameters(plain)
    folded = fold(net)
    shapes = {k: v.shape for k, v in folded.state_dict().items()}
    assert shapes == {k: v.shape for k, v in plain.state_dict().items()}
    assert infer_model(folded.state_dict()) == model
    assert count_parameters(folded) == count_parameters(plain)
    if model in PLAIN_PARAMS:
        assert count_parameters(folded) == PLAIN_PARAMS[model]
    assert "convblock6.0.weight" in net.state_dict() and "convblock1.0.k1x3.conv.weight" in net.state_dict()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, digits: D.MNISTArrays) -> tuple[Path, dict]:
    """One branched run with an EMA, never stopped: (its folder, its summary)."""
    AcceleratorState._reset_state(reset_partial_state=True)  # before the per-test fixture resets it
    tmp = tmp_path_factory.mktemp("branched")
    return tmp / "ref", run(tmp, "ref", digits, **BRANCHED)


def test_a_branched_run_saves_and_reports_the_plain_model(
    uninterrupted: tuple[Path, dict], digits: D.MNISTArrays
) -> None:
    """model.safetensors loads as a plain Net, whose accuracy is the run's reported final val
    accuracy; the last epoch's validation, of the branched form, agrees with it."""
    folder, summary = uninterrupted
    net, name = load_model(folder)
    assert name == "net" and set(weights(folder)) == set(build_model("net").state_dict())
    val = D.device_splits(digits, 0, torch.device("cpu"))["val"]
    assert accuracy(net, val, 2_000) == summary["val_acc"] > 0.3  # chance: 0.1
    last = records(folder, "epoch")[-1]
    assert last["val_acc"] == summary["val_acc"]
    assert last["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert summary["branches"] is True
    assert (summary["params"], summary["train_params"]) == (8_440, count_parameters(branched(net)))
    assert runfiles.read_summary(folder)["train_params"] == summary["train_params"]


def test_without_branches_the_trainer_trains_the_plain_model(tmp_path: Path, digits: D.MNISTArrays) -> None:
    trainer = T.Trainer(config(tmp_path, "p"), data=digits)
    try:
        assert set(trainer.net.state_dict()) == set(build_model("net").state_dict())
        assert trainer.eval_net is trainer.net  # no EMA: the live weights are evaluated and saved, unfolded
    finally:
        trainer.close()


def test_a_stopped_branched_run_resumes_to_the_uninterrupted_weights(
    uninterrupted: tuple[Path, dict], tmp_path: Path, digits: D.MNISTArrays
) -> None:
    """Stopped by SIGTERM at step 11 (mid-epoch 2), then resumed: the checkpoint holds the branched
    training state (a resume without --branches is refused), and the final plain weights equal those
    of the run never stopped, bit for bit."""
    ref_dir, _ = uninterrupted
    with pytest.raises(Preempted):
        run(tmp_path, "cut", digits, SignalAt(11, signal.SIGTERM), **BRANCHED)
    cut_dir = tmp_path / "cut"
    saved = load_state_dict(max((cut_dir / "checkpoints").iterdir()) / "model.safetensors")
    assert "convblock1.0.k1x3.conv.weight" in saved
    with pytest.raises(ConfigError, match="--branches True in the checkpoint, False now"):
        run(tmp_path, "cut", digits, resume="auto", **{**BRANCHED, "branches": False})
    run(tmp_path, "cut", digits, resume="auto", **BRANCHED)
    ref, cut = weights(ref_dir), weights(cut_dir)
    assert ref.keys() == cut.keys() and all(torch.equal(ref[k], cut[k]) for k in ref), "final weights differ"
    for kind, keys in (("step", ("step", "train/loss", "lr")), ("epoch", ("epoch", "train_loss", "val_acc"))):
        assert [[r[k] for k in keys] for r in records(cut_dir, kind)] == [
            [r[k] for k in keys] for r in records(ref_dir, kind)
        ]
    assert runfiles.read_summary(cut_dir)["val_acc"] == runfiles.read_summary(ref_dir)["val_acc"]
