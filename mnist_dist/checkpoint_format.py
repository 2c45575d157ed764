"""A checkpoint on disk: one folder ``<run>/checkpoints/step-<global step>`` that counts only when its
manifest matches every file in it.

    model.safetensors, optimizer.bin, random_states_<rank>.pkl   accelerator.save_state (+ scaler.pt, fp16)
    ema.safetensors          the EMA weights, when --ema > 0
    rank_<rank>.safetensors  per rank: the augmentation generator and the rank's meters (``meter.<name>``)
    trainer_state.json       config, plan, position (epoch, step, history, timings), OneCycleLR state
    checkpoint.json          manifest: format, size and sha256 of every file above; written last

The folder is filled as ``.tmp-step-N``, fsynced, and renamed into place, so a crash mid-write never
leaves a folder that verifies. Every file loads without running code: safetensors, JSON, or
``torch.load(weights_only=True)``; any failure is an error that names the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import load as torch_load_weights_only
from safetensors.torch import load_file

from mnist_dist.files import fsync_paths, write_json_atomic

log = logging.getLogger(__name__)

# 2: each rank's meters gained ``window_seen`` (the log window's sample count), which a format-1
# checkpoint lacks, so its resumed loss logs could not be exact.
FORMAT = 2
MANIFEST, STATE = "checkpoint.json", "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")
_TMP = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or unsafe; the message names the file."""


class FormatError(CheckpointError):
    """A complete checkpoint of another format version: refused, never skipped, so that
    ``--resume auto`` does not silently restart a run that an older version wrote."""


def folder_name(step: int) -> str:
    return f"step-{step:08d}"


def tmp_folder(final: Path) -> Path:
    """Where the checkpoint ``final`` is filled before it is renamed into place."""
    return final.with_name(_TMP + final.name)


def step_of(path: Path) -> int | None:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None


def verify(path: Path) -> dict[str, Any]:
    """The manifest of a complete, unmodified checkpoint of this format; CheckpointError otherwise."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(
            f"{path} has no {MANIFEST}: not a mnist-dist checkpoint, or its writing was interrupted"
        )
    manifest = read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path / MANIFEST} is not a mnist-dist manifest")
    if manifest.get("format") != FORMAT:
        raise FormatError(
            f"{path} is a format-{manifest.get('format')} checkpoint; this version of mnist-dist reads "
            f"format {FORMAT} only: resume it with the version that wrote it, or start a new run"
        )
    for name, meta in manifest["files"].items():
        file = path / name
        if "/" in name or name.startswith(".") or not file.is_file():
            raise CheckpointError(f"{path}: file {name!r} listed in the manifest is missing")
        if file.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{file} is truncated or altered: {file.stat().st_size:,} bytes, manifest says {meta['bytes']:,}"
            )
        if sha256_file(file) != meta["sha256"]:
            raise CheckpointError(f"{file} changed after it was written (sha256 differs from the manifest)")
    return manifest


def candidates(ckpt_dir: Path) -> list[Path]:
    """The checkpoint folders of a run, highest step first (unfinished ``.tmp-`` folders never count)."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [p for p in Path(ckpt_dir).iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0, reverse=True)


def find_latest(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; newer damaged ones are skipped with a warning, and one of
    another format is refused (FormatError)."""
    for path in candidates(ckpt_dir):
        try:
            verify(path)
            return path
        except FormatError:
            raise
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
    return None


def commit(tmp: Path, final: Path, info: dict[str, Any]) -> Path:
    """Seal the filled folder ``tmp``: fsync its files, write the manifest (``info`` plus the size and
    sha256 of every file) last, and rename it to ``final``, replacing an older attempt at that step."""
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    fsync_paths(*files)
    manifest = {
        **info,
        "format": FORMAT,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    }
    write_json_atomic(tmp / MANIFEST, manifest)
    fsync_paths(tmp)
    if final.exists():  # e.g. a corrupt one at this step that a resume skipped
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_paths(final.parent)
    return final


def prune(ckpt_dir: Path, written: Path, keep: int) -> list[Path]:
    """After writing ``written``: remove every checkpoint of a higher step (the future a resume from an
    earlier step discarded; ``--resume auto`` would jump back to it), then all but the ``keep``
    highest steps. Returns what was removed."""
    newest = step_of(written)
    found = [(step_of(p), p) for p in candidates(ckpt_dir)]
    stale = [p for step, p in found if step > newest]
    kept = [p for step, p in found if step <= newest]
    removed = stale + kept[keep:]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True (plus accelerate's numpy allowances for RNG states)."""
    try:
        return torch_load_weights_only(path, map_location="cpu")
    except Exception as e:
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
        raise CheckpointError(
            f"{path} does not load without running code, or is corrupt (weights_only=True refused it: "
            f"{reason.strip()})"
        ) from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of named tensors (a rank's generator state and meters)."""
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
