"""Reading a user's own digit pictures: each is brought into MNIST's form, then the model classifies
them in batches.

MNIST's digits are light on black, fitted into a 20x20 box with their aspect ratio kept (resampling
leaves grey, anti-aliased edges) and placed in a 28x28 field by their centre of mass. A photo or a
drawing is none of that, and a model trained on MNIST reads it well only after the same steps: grey,
inverted when the digit is darker than its background, background set to black, cropped to the
digit, fitted into 20x20, centred by its centre of mass, normalised as in training.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageStat, UnidentifiedImageError

from mnist_dist import data as D
from mnist_dist.distributed import local_device
from mnist_dist.files import atomic_write
from mnist_dist.weights import load_model

SIDE = 28  # the model's input field
FIT = 20  # the box MNIST's digits are fitted into
CENTRE = 14.0  # where MNIST's digits have their centre of mass (row and column; pixel centres 0..27)
MIN_CONTRAST = 0.1  # ink this far (of the 0..1 range) from the background, or the picture holds no digit
NOISE_FLOOR = 0.1  # share of the ink's contrast counted as background: paper grain, JPEG ringing
BATCH = 256  # files read, preprocessed and classified at a time, so memory stays flat for any count
TOP = 3  # guesses the plain output lists
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageError(Exception):
    """A file that yields no digit: unreadable, not an image, or blank. The message says which."""


@dataclass(frozen=True)
class Prediction:
    file: Path
    probabilities: list[float]
    preprocessed: Path | None = None

    @property
    def digit(self) -> int:
        return max(range(len(self.probabilities)), key=self.probabilities.__getitem__)

    def top(self, k: int = TOP) -> list[tuple[int, float]]:
        ranked = sorted(range(len(self.probabilities)), key=self.probabilities.__getitem__, reverse=True)
        return [(d, self.probabilities[d]) for d in ranked[:k]]

    def line(self) -> str:
        guesses = ", ".join(f"{d} {p:.1%}" for d, p in self.top())
        return f"{self.file}: {self.digit} ({self.probabilities[self.digit]:.1%})  top {TOP}: {guesses}"

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "file": str(self.file),
            "digit": self.digit,
            "probabilities": self.probabilities,
        }
        if self.preprocessed is not None:
            record["preprocessed"] = str(self.preprocessed)
        return record


@dataclass(frozen=True)
class Failure:
    file: Path
    message: str

    def line(self) -> str:
        return f"{self.file}: {self.message}"


# ---------------------------------------------------------------------- inputs
def ready_model(weights: Path, model: str | None = None) -> torch.nn.Module:
    """The saved model (see ``weights.load_model``) in eval mode, on the GPU when there is one."""
    net, _ = load_model(weights, model)
    return net.to(local_device()).eval()


def output_dir_problem(path: Path) -> str | None:
    """Why the preprocessed digits cannot be written under ``path``; None when they can. The folder
    itself is made only when the first digit is written, so a run that reads no digit leaves none."""
    if path.exists():
        return None if path.is_dir() and os.access(path, os.W_OK) else "is not a writable folder"
    parent = next(p for p in path.absolute().parents if p.exists())
    return None if parent.is_dir() and os.access(parent, os.W_OK) else f"cannot be made in {parent}"


def input_files(paths: Sequence[Path]) -> list[Path | Failure]:
    """The files to read, in order: each path as given, or a folder's entries sorted by name (its
    subfolders are not entered). An entry that is not an image becomes an error line later, so nothing
    in a folder is skipped unseen."""
    items: list[Path | Failure] = []
    for path in paths:
        if not path.is_dir():
            items.append(path)
            continue
        try:
            files = sorted(p for p in path.iterdir() if not p.is_dir())
        except OSError as e:
            items.append(Failure(path, f"cannot list this folder ({e.strerror})"))
            continue
        items.extend(files or [Failure(path, "folder holds no files")])
    return items


def read_image(path: Path) -> Image.Image:
    """The decoded picture, turned as its EXIF orientation says; ImageError for anything else."""
    try:
        if path.stat().st_size == 0:
            raise ImageError("empty file")
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here, not halfway through later steps
            return ImageOps.exif_transpose(opened)
    except UnidentifiedImageError:
        raise ImageError("not an image (Pillow cannot read this format)") from None
    except _READ_ERRORS as e:
        raise ImageError(f"unreadable image ({e})") from None


# ---------------------------------------------------------------------- preprocessing
def grey(image: Image.Image) -> torch.Tensor:
    """Luminance in [0, 1], (H, W). A transparent background becomes the shade opposite the strokes'."""
    if {"A", "a"} & set(image.getbands()) or "transparency" in image.info:
        image = _flatten(image.convert("RGBA"))
    image = image.convert("L")
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width).float() / 255


def _flatten(rgba: Image.Image) -> Image.Image:
    """Composite over white when the visible pixels are dark on average, else over black."""
    alpha = rgba.getchannel("A")
    visible = alpha.getextrema()[1] > 0
    dark = not visible or ImageStat.Stat(rgba.convert("L"), mask=alpha).mean[0] < 128
    backdrop = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if dark else (0, 0, 0, 255))
    return Image.alpha_composite(backdrop, rgba)


def _ink(x: torch.Tensor) -> torch.Tensor:
    """The digit light on black in [0, 1]: inverted when the picture is darker on average than its
    background (the border's median shade); the background and its noise become 0."""
    border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])
    background = border.median()
    if x.mean() < background:
        x, background = 1 - x, 1 - background
    peak = x.max()
    if peak - background < MIN_CONTRAST:
        raise ImageError("no digit found (the picture is one uniform shade)")
    floor = background + NOISE_FLOOR * (peak - background)
    return ((x - floor) / (peak - floor)).clamp(0, 1)


def _crop(ink: torch.Tensor) -> torch.Tensor:
    rows, cols = ink.any(1).nonzero()[:, 0], ink.any(0).nonzero()[:, 0]
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _fit(digit: torch.Tensor) -> torch.Tensor:
    """Scaled so its longer side is FIT pixels (aspect kept, anti-aliased), its brightest pixel 1."""
    h, w = digit.shape
    scale = FIT / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    fitted = F.interpolate(digit[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)
    fitted = fitted[0, 0].clamp(0, 1)
    return fitted / fitted.max()


def _centre(digit: torch.Tensor) -> torch.Tensor:
    """The digit in a SIDE x SIDE field with its centre of mass at (CENTRE, CENTRE), or as near as the
    field allows without cutting the digit off."""
    h, w = digit.shape
    mass = digit.sum()
    row = (digit.sum(1) * torch.arange(h)).sum() / mass
    col = (digit.sum(0) * torch.arange(w)).sum() / mass
    top = int((CENTRE - row).round().clamp(0, SIDE - h))
    left = int((CENTRE - col).round().clamp(0, SIDE - w))
    field = digit.new_zeros(SIDE, SIDE)
    field[top : top + h, left : left + w] = digit
    return field


def preprocess(image: Image.Image) -> torch.Tensor:
    """The picture as an MNIST digit: (28, 28) uint8, light on black. ImageError when it holds none."""
    digit = _centre(_fit(_crop(_ink(grey(image)))))
    return (digit * 255).round().to(torch.uint8)


def save_png(digit: torch.Tensor, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.frombytes("L", (SIDE, SIDE), bytes(digit.flatten().tolist()))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


# ---------------------------------------------------------------------- prediction
@torch.no_grad()
def classify(model: torch.nn.Module, digits: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, 10) of uint8 digits (N, 28, 28), normalised as in training."""
    model.eval()
    x = D.normalize(digits[:, None].to(next(model.parameters()).device))
    return model(x).float().exp().cpu()


def predict_files(
    model: torch.nn.Module,
    items: Sequence[Path | Failure],
    save_dir: Path | None = None,
) -> Iterator[Prediction | Failure]:
    """One result per item, in order, BATCH files at a time: read, preprocess, classify, yield. With
    ``save_dir`` each preprocessed digit is written there as <file stem>.png (-2, -3... on a clash)."""
    used: set[str] = set()
    for start in range(0, len(items), BATCH):
        results: list[Path | Failure] = []
        digits = []
        for item in items[start : start + BATCH]:
            if isinstance(item, Path):
                try:
                    digits.append(preprocess(read_image(item)))
                except ImageError as e:
                    item = Failure(item, str(e))
            results.append(item)
        probabilities = classify(model, torch.stack(digits)).tolist() if digits else []
        classified = iter(zip(digits, probabilities, strict=True))
        for result in results:
            if isinstance(result, Failure):
                yield result
                continue
            digit, probs = next(classified)
            written = save_png(digit, save_dir / _unique_name(result.stem, used)) if save_dir else None
            yield Prediction(result, probs, written)


def _unique_name(stem: str, used: set[str]) -> str:
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.png"
    used.add(name)
    return name
