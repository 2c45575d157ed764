"""MNIST as uint8 tensors on the training device: loading, the 50k/10k split, sharded sampling,
batched per-sample augmentation and the fixed views of test-time augmentation.

torchvision's MNIST downloads the files from its mirrors. Their md5s are written here (a test
holds them equal to torchvision's list) so that reading the data, which every rank does, never pays
for importing torchvision. We read the verified ``.gz`` files directly instead of letting
torchvision extract them: nothing is ever written beside the user's files, a read-only data
directory works, and N ranks reading at once cannot race.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
import torch.nn.functional as F

from mnist_dist.spec import ELASTIC_SIGMA, N_TRAIN, N_VAL, View, step_bounds

MEAN, STD = 0.1307, 0.3081
# name -> (md5, idx magic, dims)
FILES = {
    "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", 2051, (60_000, 28, 28)),
    "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432", 2049, (60_000,)),
    "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3", 2051, (10_000, 28, 28)),
    "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c", 2049, (10_000,)),
}


class DataError(RuntimeError):
    """The MNIST files are missing, truncated or corrupt; the message names the file."""


def raw_dir(root: Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def missing_files(root: Path) -> list[str]:
    return [name for name in FILES if not (raw_dir(root) / name).is_file()]


def download(root: Path) -> Path:
    """Fetch the missing .gz files with torchvision (md5-checked) under a lock; return the raw dir.

    The lock makes N processes starting at once wait for one download instead of racing on it.
    """
    raw = raw_dir(root)
    created = [p for p in (raw, *raw.parents) if not p.exists()][::-1]  # outermost first
    try:
        raw.mkdir(parents=True, exist_ok=True)
        lock = open(raw / ".download.lock", "w")  # noqa: SIM115 - held for the whole download
    except OSError as e:
        raise DataError(f"cannot create {raw} to download MNIST into: {e}") from None
    try:
        _download_locked(lock, raw, root)
    except DataError:
        for folder in reversed(created):  # leave nothing behind a failed download
            (folder / ".download.lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        lock.close()
        (raw / ".download.lock").unlink(missing_ok=True)
    return raw


def _download_locked(lock: IO[str], raw: Path, root: Path) -> None:
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import download_url

    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in missing_files(root):
            errors = []
            for mirror in MNIST.mirrors:
                try:
                    download_url(f"{mirror}{name}", str(raw), name, FILES[name][0])
                    break
                except Exception as e:
                    errors.append(f"{mirror}: {e}")
                    (raw / name).unlink(missing_ok=True)
            else:
                raise DataError(
                    f"could not download {name} into {raw} ({'; '.join(errors)}). Offline? Stage the "
                    "data on a connected machine with `mnist-dist download --data-dir DIR` and point "
                    "--data-dir or MNIST_DATA_DIR at DIR."
                )


def _read_idx(path: Path) -> torch.Tensor:
    """Verify the file's md5 and IDX header, and return its contents as a uint8 tensor."""
    md5, magic, dims = FILES[path.name]
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    digest = hashlib.md5(blob).hexdigest()
    if digest != md5:
        raise DataError(
            f"{path} is corrupt or truncated: md5 {digest}, expected {md5} ({len(blob):,} bytes on "
            "disk). Delete it and run `mnist-dist download` again."
        )
    data = gzip.decompress(blob)
    header = int.from_bytes(data[:4], "big")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(len(dims)))
    if header != magic or shape != dims:
        raise DataError(f"{path}: IDX header says magic {header} shape {shape}, expected {magic} {dims}")
    offset = 4 + 4 * len(dims)
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(dims)


@dataclass
class MNISTArrays:
    """The raw 60k training and 10k test sets, on the CPU."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_mnist(root: Path, allow_download: bool = True) -> MNISTArrays:
    """Read (downloading first if missing and allowed) and verify the four MNIST files under root."""
    root = Path(root)
    if missing_files(root):
        if not allow_download:
            raise DataError(f"MNIST files missing in {raw_dir(root)}: {', '.join(missing_files(root))}")
        download(root)
    t = {name: _read_idx(raw_dir(root) / name) for name in FILES}
    return MNISTArrays(
        t["train-images-idx3-ubyte.gz"],
        t["train-labels-idx1-ubyte.gz"].long(),
        t["t10k-images-idx3-ubyte.gz"],
        t["t10k-labels-idx1-ubyte.gz"].long(),
    )


def split_indices(split_seed: int, n: int = N_TRAIN + N_VAL) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic 50k/10k split of the 60k training set: same for every world size and seed.
    A smaller set (the tests' synthetic digits) is split in the same proportion."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_train = n - n * N_VAL // (N_TRAIN + N_VAL)
    return perm[:n_train], perm[n_train:]


@dataclass
class DeviceSplit:
    """One split held once on the device: images (N,1,28,28) uint8 and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def device_splits(
    arrays: MNISTArrays, split_seed: int, device: torch.device, max_train: int | None = None
) -> dict[str, DeviceSplit]:
    train_idx, val_idx = split_indices(split_seed, len(arrays.train_images))
    if max_train is not None:
        train_idx = train_idx[:max_train]

    def put(images: torch.Tensor, labels: torch.Tensor) -> DeviceSplit:
        return DeviceSplit(images.unsqueeze(1).to(device), labels.to(device))

    return {
        "train": put(arrays.train_images[train_idx], arrays.train_labels[train_idx]),
        "val": put(arrays.train_images[val_idx], arrays.train_labels[val_idx]),
        "test": put(arrays.test_images, arrays.test_labels),
    }


# ---------------------------------------------------------------------- sampling
class ShardedSampler:
    """Index plan for one run: every epoch a fresh permutation (from seed and epoch), cut into
    optimizer steps of ``batch * world * accum`` samples; rank r takes its contiguous slice of each
    step, so the ranks together see every sample exactly once per epoch.

    The steps are ``step_bounds``'. Every rank knows the whole plan, so they all agree on the number
    of steps and micro-batches without communicating.
    """

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int, accum: int = 1) -> None:
        self.n, self.batch, self.world, self.rank, self.seed, self.accum = n, batch, world, rank, seed, accum
        self._bounds = step_bounds(n, batch * world * accum, world)

    def steps_per_epoch(self) -> int:
        return len(self._bounds) - 1

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def epoch(
        self, epoch: int, start_step: int = 0, device: torch.device | None = None
    ) -> Iterator[tuple[list[torch.Tensor], int]]:
        """Yield (this rank's micro-batches of indices, global sample count) for each optimizer
        step. The permutation moves to the device once per epoch, not once per step."""
        perm = self.permutation(epoch).to(device or "cpu")
        for lo, hi in zip(self._bounds[start_step:-1], self._bounds[start_step + 1 :], strict=True):
            shards = torch.tensor_split(perm[lo:hi], self.world)
            micro = min(self.accum, min(len(s) for s in shards))
            yield list(torch.tensor_split(shards[self.rank], micro)), hi - lo


def eval_shard(n: int, world: int, rank: int) -> torch.Tensor:
    """Rank r's contiguous share of n evaluation samples: exact, no padding, no duplicates."""
    return torch.tensor_split(torch.arange(n), world)[rank]


# ---------------------------------------------------------------------- augmentation
def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    return (images_u8.float() / 255.0 - MEAN) / STD


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of each channel (zero padding, kernel sum 1, radius 3 sigma)."""
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(x, k.view(x.shape[1], 1, 1, -1), padding=(0, radius), groups=x.shape[1])
    return F.conv2d(x, k.view(x.shape[1], 1, -1, 1), padding=(radius, 0), groups=x.shape[1])


def _affine_grid(
    x: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor
) -> torch.Tensor:
    """The sampling grid that rotates each image by ``angle`` (radians) about its centre, zooms it by
    ``zoom`` and moves it by (tx, ty) in grid units. The grid maps output pixels to input pixels, so it
    holds the inverse transform."""
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, -tx], 1), torch.stack([sin, cos, -ty], 1)], 1)
    return F.affine_grid(theta, list(x.shape), align_corners=False)


def augment(
    images_u8: torch.Tensor,
    generator: torch.Generator,
    rotate: float,
    translate: float = 0.0,
    scale: float = 0.0,
    interpolation: str = "nearest",
    elastic: float = 0.0,
) -> torch.Tensor:
    """Random rotation (a fresh angle per image, uniform in [-rotate, rotate] as torchvision's
    RandomRotation draws it), translation, scaling and elastic distortion, applied to the whole batch
    at once with one sampling grid; fill 0 before normalization. Returns normalized float images.

    The elastic distortion is Simard et al. (2003)'s: a uniform(-1, 1) displacement field per pixel,
    smoothed by a Gaussian of sigma ELASTIC_SIGMA pixels and scaled by `elastic` (their alpha).
    """
    x = images_u8.float() / 255.0
    if rotate == 0 and translate == 0 and scale == 0 and elastic == 0:
        return (x - MEAN) / STD
    n, dev = x.shape[0], x.device

    def uniform(bound: float) -> torch.Tensor:
        return torch.empty(n, device=dev).uniform_(-bound, bound, generator=generator)

    angle = torch.deg2rad(uniform(rotate))
    zoom = 1.0 + uniform(scale) if scale else torch.ones(n, device=dev)
    h = x.shape[-1]
    tx = uniform(translate) * 2 / h if translate else torch.zeros(n, device=dev)
    ty = uniform(translate) * 2 / h if translate else torch.zeros(n, device=dev)
    grid = _affine_grid(x, angle, zoom, tx, ty)
    if elastic:
        field = torch.empty(n, 2, h, h, device=dev).uniform_(-1, 1, generator=generator)
        grid = grid + (_gaussian_blur(field, ELASTIC_SIGMA) * (elastic * 2 / h)).permute(0, 2, 3, 1)
    x = F.grid_sample(x, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    return (x - MEAN) / STD


def view(images_u8: torch.Tensor, v: View) -> torch.Tensor:
    """``images_u8`` (N,1,H,W) seen as ``v``, normalized. The shift is exact (zero-padded and cropped,
    no resampling); the rotation samples nearest pixels through ``augment``'s grid, fill 0 before
    normalization, as training sees its rotations."""
    x = images_u8
    if v.dx or v.dy:
        h, w = x.shape[-2:]
        pad = (max(v.dx, 0), max(-v.dx, 0), max(v.dy, 0), max(-v.dy, 0))  # left, right, top, bottom
        x = F.pad(x, pad)[..., max(-v.dy, 0) : max(-v.dy, 0) + h, max(-v.dx, 0) : max(-v.dx, 0) + w]
    if not v.degrees:
        return normalize(x)
    x = x.float() / 255.0
    n, dev = x.shape[0], x.device
    angle = torch.full((n,), math.radians(v.degrees), device=dev)
    zero = torch.zeros(n, device=dev)
    grid = _affine_grid(x, angle, torch.ones(n, device=dev), zero, zero)
    x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return (x - MEAN) / STD
