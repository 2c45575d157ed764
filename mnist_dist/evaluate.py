"""Load saved weights without executing code and measure them on the validation and test sets."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mnist_dist import data as D
from mnist_dist.model import Net

_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


class WeightsError(ValueError):
    """A weights file that is not Net's state dict, or not loadable without running code."""


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a plain PyTorch state dict read with weights_only=True (no pickle code runs)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path} is not a readable safetensors file: {e}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightsError(
                f"{path} is not a plain PyTorch state dict that loads without running code "
                f"(weights_only=True refused it: {first})"
            ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds a {type(state).__name__}, expected a state dict of tensors")
    return {_strip(k): v for k, v in state.items()}


def _strip(key: str) -> str:
    """Remove wrapper prefixes in any nesting (DDP over a compiled module: module._orig_mod.)."""
    while key.startswith(_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def load_net(path: Path) -> Net:
    net = Net()
    state = load_state_dict(path)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not match Net: {str(e).splitlines()[0]} ...") from None
    return net


@torch.no_grad()
def accuracy(net: Net, split: D.DeviceSplit, batch: int) -> float:
    net.eval()
    correct = 0
    for lo in range(0, len(split), batch):
        out = net(D.normalize(split.images[lo : lo + batch]))
        correct += int((out.argmax(1) == split.labels[lo : lo + batch]).sum())
    return correct / len(split)


def evaluate_weights(path: Path, data_root: Path, split_seed: int, batch: int) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = load_net(path).to(device)
    splits = D.device_splits(D.load_mnist(data_root), split_seed, device, max_train=1)
    return {
        "val_acc": accuracy(net, splits["val"], batch),
        "val_count": len(splits["val"]),
        "test_acc": accuracy(net, splits["test"], batch),
        "test_count": len(splits["test"]),
    }
