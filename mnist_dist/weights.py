"""Model weights on disk: written as safetensors, read without executing code.

Every reader of weights (evaluate, the checkpointer, later predict and export) goes through
``load_state_dict`` or ``load_model``; every writer through ``save_weights``. ``load_model`` takes any
model the harness trains: the name comes from the run's config.json, else from the tensor shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mnist_dist import runfiles
from mnist_dist.files import atomic_write
from mnist_dist.model import Net, build_model
from mnist_dist.spec import MODELS

_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers
# The reference design's code exists with its 1x1 output conv bare or wrapped in a Sequential (ours).
_RENAMED = {"convblock6.weight": "convblock6.0.weight"}
_LISTED = 6  # keys named per kind in a mismatch message, so that it stays one readable line


class WeightsError(ValueError):
    """A weights file that is not a model's state dict, or not loadable without running code."""


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a plain PyTorch state dict read with weights_only=True (no pickle code runs),
    with the keys our modules use: wrapper prefixes stripped, the reference's bare layout renamed."""
    path = Path(path)
    # Neither reader runs code, but a malformed file makes them raise whatever they trip on: torch's
    # TypeError for a declared shape past 64 bits, the unpickler's IndexError or KeyError, ...
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:
            raise WeightsError(f"{path} is not a readable safetensors file: {_first_line(e)}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(
                f"{path} is not a plain PyTorch state dict that loads without running code "
                f"(weights_only=True refused it: {_first_line(e)})"
            ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds a {type(state).__name__}, expected a state dict of tensors")
    state = {_strip(k): v for k, v in state.items()}
    for old, new in _RENAMED.items():
        if old in state and new not in state:
            state[new] = state.pop(old)
    return state


def _first_line(error: Exception) -> str:
    """The error's first line (torch appends its C++ stack), or its type when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _strip(key: str) -> str:
    """Remove wrapper prefixes in any nesting (DDP over a compiled module: module._orig_mod.)."""
    while key.startswith(_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def save_weights(module: torch.nn.Module, path: Path) -> Path:
    """The module's state dict as safetensors (no pickle, no code on load), written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def load_model(path: Path, model: str | None = None) -> tuple[Net, str]:
    """The model saved at ``path`` (a run folder, or a weights file) and its name in ``MODELS``.

    The name is ``model`` when given, else the ``model`` of the run's config.json (the folder's, or
    the one beside a run's model.safetensors), else whichever model has the file's tensor shapes.
    """
    if model is not None and model not in MODELS:
        raise WeightsError(f"model {model!r} is not one of {', '.join(MODELS)}")
    path = Path(path)
    weights = path / runfiles.WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        where = (
            f"run folder {path} has no {runfiles.WEIGHTS_FILE}"
            if path.is_dir()
            else f"{path} is not a regular file (a device or a pipe)"
            if path.exists()
            else f"{path} does not exist"
        )
        raise WeightsError(where)
    state = load_state_dict(weights)
    name = model or _configured_model(weights)
    if name is None:
        try:
            name = infer_model(state)
        except WeightsError as e:
            raise WeightsError(f"{weights}: {e}") from None
    net = build_model(name)
    if problems := _mismatch(net.state_dict(), state):
        raise WeightsError(f"{weights} does not fit model {name!r}: {problems}")
    net.load_state_dict(state, strict=True)
    return net, name


def _configured_model(weights: Path) -> str | None:
    """The model named by the config.json of the run that wrote ``weights``, if there is one."""
    if weights.name != runfiles.WEIGHTS_FILE:
        return None
    try:
        config = runfiles.read_config(weights.parent)
    except runfiles.RunFilesError as e:
        raise WeightsError(str(e)) from None
    name = None if config is None else config.get("model")
    if name is not None and name not in MODELS:
        raise WeightsError(
            f"{weights.parent / runfiles.CONFIG_FILE} names model {name!r}, not one of {', '.join(MODELS)}"
        )
    return name


def infer_model(state: dict[str, torch.Tensor]) -> str:
    """The one model in ``MODELS`` whose state dict has exactly these keys and tensor shapes."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    expected = {name: build_model(name).state_dict() for name in MODELS}
    for name, model_state in expected.items():
        if shapes == {k: tuple(v.shape) for k, v in model_state.items()}:
            return name
    nearest = max(expected, key=lambda name: len(expected[name].keys() & state.keys()))
    if expected[nearest].keys() != state.keys():  # another layout: its keys say more than its shapes
        raise WeightsError(
            f"its keys match none of the models {', '.join(MODELS)}; against the nearest, {nearest!r}: "
            f"{_mismatch(expected[nearest], state)}; name one with --model"
        )
    convs = [f"{k} {list(s)}" for k, s in shapes.items() if len(s) == 4] or [
        f"{k} {list(s)}" for k, s in shapes.items()
    ]
    raise WeightsError(
        f"its tensor shapes ({_listed(convs)}) match none of the models {', '.join(MODELS)}; "
        "name one with --model"
    )


def _mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """Why ``state`` does not load into a model with the ``expected`` state dict; "" when it does."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} (model {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = [("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)]
    return "; ".join(f"{label}: {_listed(items)}" for label, items in parts if items)


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more
