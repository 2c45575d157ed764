"""Weights in and out: every model the harness trains loads from a run folder, its weights file or a
bare state dict (the model inferred from the shapes); the reference design's layouts load; nothing
that would run code does; every file that does not fit gets one line saying why."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mnist_dist import data as D
from mnist_dist.cli import app
from mnist_dist.config import TrainConfig, default_data_dir
from mnist_dist.model import MODELS, Net, build_model
from mnist_dist.runfiles import WEIGHTS_FILE, write_config
from mnist_dist.weights import WeightsError, infer_model, load_model, load_state_dict, save_weights

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def trained_looking(name: str) -> Net:
    """A model whose BatchNorm statistics are not the initial ones, so a round trip must carry them."""
    torch.manual_seed(1)
    net = build_model(name)
    net.train()
    with torch.no_grad():
        net(X)
    return net.eval()


def run_folder(root: Path, name: str) -> tuple[Path, Net]:
    run = root / f"run-{name}"
    run.mkdir()
    net = trained_looking(name)
    save_weights(net, run / WEIGHTS_FILE)
    write_config(run, TrainConfig(model=name))
    return run, net


def outputs(net: Net) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(X)


def same_model(loaded: Net, original: Net) -> None:
    assert loaded.state_dict().keys() == original.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(outputs(loaded), outputs(original))


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_round_trips_from_a_run_its_file_and_a_bare_file(name: str, tmp_path: Path) -> None:
    run, net = run_folder(tmp_path, name)
    bare = tmp_path / "bare.safetensors"  # no config.json beside it: the shapes decide
    bare.write_bytes((run / WEIGHTS_FILE).read_bytes())
    for path, model in [(run, None), (run / WEIGHTS_FILE, None), (bare, None), (bare, name)]:
        loaded, loaded_name = load_model(path, model)
        assert loaded_name == name, path
        same_model(loaded, net)


def test_config_json_decides_over_the_shapes(tmp_path: Path) -> None:
    run, _ = run_folder(tmp_path, "net_wider")
    write_config(run, TrainConfig(model="net"))  # a config that contradicts the weights
    with pytest.raises(WeightsError, match=r"does not fit model 'net': shape mismatches: convblock1\.0"):
        load_model(run)
    assert load_model(run, "net_wider")[1] == "net_wider"  # --model overrides the config


def test_an_override_that_does_not_fit_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = dict(trained_looking("net").state_dict())
    del state["convblock1.0.weight"]
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as caught:
        load_model(path, "net")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert "missing keys: convblock1.0.weight" in message and "unexpected keys: head.weight" in message
    with pytest.raises(WeightsError, match=r"shape mismatches: convblock1\.0\.weight \[16, 1, 3, 3\]"):
        load_model(run_folder(tmp_path, "net_wider")[0] / WEIGHTS_FILE, "net")


def test_shapes_of_no_known_model_are_named_with_the_models_known(tmp_path: Path) -> None:
    path = tmp_path / "narrow.safetensors"
    save_weights(Net(width1=4, width2=8), path)
    with pytest.raises(WeightsError) as caught:
        load_model(path)
    message = str(caught.value)
    assert str(path) in message and "convblock1.0.weight [4, 1, 3, 3]" in message
    assert "net, net_wide, net_wider, net_w24x23, net_w8x25" in message and "\n" not in message
    with pytest.raises(WeightsError, match="match none"):
        infer_model({"w": torch.zeros(2)})


def test_unknown_model_names_are_refused(tmp_path: Path) -> None:
    run, _ = run_folder(tmp_path, "net")
    with pytest.raises(
        WeightsError, match=r"model 'resnet' is not one of net, net_wide, net_wider, net_w24x23, net_w8x25"
    ):
        load_model(run, "resnet")
    (run / "config.json").write_text('{"model": "resnet"}\n')
    with pytest.raises(WeightsError, match=r"config\.json names model 'resnet', not one of net,"):
        load_model(run)


def test_missing_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"nothing\.pt does not exist"):
        load_model(tmp_path / "nothing.pt")
    with pytest.raises(WeightsError, match=r"has no model\.safetensors"):
        load_model(tmp_path)


def test_the_reference_layouts_load_and_give_the_same_outputs(tmp_path: Path) -> None:
    net = trained_looking("net")
    ours = dict(net.state_dict())  # the 1x1 output conv inside a Sequential: convblock6.0.weight
    bare = {("convblock6.weight" if k == "convblock6.0.weight" else k): v for k, v in ours.items()}
    assert "convblock6.weight" in bare
    for layout, state in {"sequential": ours, "bare": bare}.items():
        torch.save(state, tmp_path / f"{layout}.pt")
        loaded, name = load_model(tmp_path / f"{layout}.pt")
        assert name == "net", layout
        same_model(loaded, net)


def test_wrapper_prefixes_are_stripped(tmp_path: Path) -> None:
    net = trained_looking("net_wide")
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        path = tmp_path / f"{prefix.replace('.', '-')}.safetensors"
        save_file({prefix + k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
        assert set(load_state_dict(path)) == set(net.state_dict())
        same_model(load_model(path)[0], net)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    path = tmp_path / "evil.pt"
    torch.save({"convblock1.0.weight": Payload()}, path)
    with pytest.raises(WeightsError, match="weights_only=True refused it") as caught:
        load_model(path)
    assert str(path) in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_unreadable_files_name_their_path(suffix: str, tmp_path: Path) -> None:
    noise = tmp_path / f"noise{suffix}"
    noise.write_bytes(bytes((37 * i + 11) % 256 for i in range(4096)))
    with pytest.raises(WeightsError, match=re.escape(f"{noise} is not")):
        load_model(noise)
    good = tmp_path / f"good{suffix}"
    if suffix == ".pt":
        torch.save(trained_looking("net").state_dict(), good)
    else:
        save_weights(trained_looking("net"), good)
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match=re.escape(f"{truncated} is not")):
        load_model(truncated)


def test_a_file_of_something_else_than_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="holds a list, expected a state dict of tensors"):
        load_model(path)


def test_save_weights_writes_the_state_dict_as_plain_safetensors(tmp_path: Path) -> None:
    """The file format the runs' model.safetensors always had, byte for byte, and no temporary left."""
    net = trained_looking("net_wider")
    save_weights(net, tmp_path / "a.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "b"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b"]


# ---------------------------------------------------------------------- the CLI
def test_cli_refusals_are_one_line_with_exit_2(tmp_path: Path) -> None:
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(b"not a safetensors file at all")
    for args, says in [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(noise)], "is not a readable safetensors file"),
        ([str(run_folder(tmp_path, "net")[0]), "--model", "resnet"], "is not one of"),
    ]:
        result = CliRunner().invoke(app, ["evaluate", *args])
        assert result.exit_code == 2, result.output
        assert says in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.skipif(bool(D.missing_files(default_data_dir())), reason="MNIST not found (set MNIST_DATA_DIR)")
def test_evaluate_takes_the_default_presets_model_from_the_run(tmp_path: Path) -> None:
    """Defect (a): evaluate built the reference Net only and refused net_wider's weights."""
    run, _ = run_folder(tmp_path, "net_wider")
    result = CliRunner().invoke(app, ["evaluate", str(run)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("val  ") and lines[0].endswith("(10,000 images, split seed 0)"), lines
    assert lines[1].startswith("test ") and lines[1].endswith("(10,000 images)"), lines
