"""MNIST loading, the deterministic split, exact sharding and the batched device augmentation."""

from __future__ import annotations

import gzip
import hashlib
import math
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_dist import data as D

from .helpers import cli


def copy_raw(data_root: Path, dest: Path) -> Path:
    raw = D.raw_dir(dest)
    raw.mkdir(parents=True)
    for name in D.missing_files(dest):
        shutil.copy(D.raw_dir(data_root) / name, raw / name)
    return raw


def test_real_files_load_with_the_official_shapes(mnist: D.MNISTArrays) -> None:
    assert mnist.train_images.shape == (60_000, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.test_images.shape == (10_000, 28, 28)
    assert mnist.train_labels.bincount().tolist()[:2] == [5923, 6742]  # the known class counts
    assert mnist.test_labels.bincount().tolist()[1] == 1135


def test_split_is_deterministic_disjoint_and_seeded() -> None:
    train, val = D.split_indices(0)
    again_train, again_val = D.split_indices(0)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert len(train) == 50_000 and len(val) == 10_000
    assert len(set(train.tolist()) | set(val.tolist())) == 60_000
    assert not torch.equal(D.split_indices(1)[1], val)


def test_read_only_data_dir_works_and_nothing_is_written(data_root: Path, tmp_path: Path) -> None:
    raw = copy_raw(data_root, tmp_path / "ro")
    before = sorted(p.name for p in raw.iterdir())
    for path in [*raw.iterdir(), raw, raw.parent, raw.parent.parent]:
        path.chmod(stat.S_IRUSR | stat.S_IXUSR | (stat.S_IRUSR if path.is_file() else 0))
    try:
        arrays = D.load_mnist(tmp_path / "ro")
        assert arrays.train_images.shape[0] == 60_000
        assert sorted(p.name for p in raw.iterdir()) == before
    finally:
        for path in [raw.parent.parent, raw.parent, raw, *raw.iterdir()]:
            path.chmod(stat.S_IRWXU)


@pytest.mark.proof
def test_processes_starting_at_once_do_not_race(data_root: Path) -> None:
    code = f"from mnist_dist.data import load_mnist; load_mnist({str(data_root)!r}); print('ok')"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0] and all("ok" in o for o in outs)


@pytest.mark.proof
def test_truncated_file_gives_one_clear_error_naming_it(data_root: Path, tmp_path: Path) -> None:
    raw = copy_raw(data_root, tmp_path / "bad")
    victim = raw / "train-labels-idx1-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:1000])
    result = cli("evaluate", str(tmp_path / "none.safetensors"), "--data-dir", str(tmp_path / "bad"))
    assert result.returncode == 2 and "does not exist" in result.stderr  # weights checked first
    with pytest.raises(
        D.DataError, match=r"train-labels-idx1-ubyte\.gz is corrupt or truncated: md5 .* expected"
    ):
        D.load_mnist(tmp_path / "bad")
    result = cli("train", "--data-dir", str(tmp_path / "bad"), "--output-dir", str(tmp_path / "runs"))
    assert result.returncode == 1
    assert "train-labels-idx1-ubyte.gz is corrupt or truncated" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_wrong_header_is_reported(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = copy_raw(data_root, tmp_path / "hdr")
    victim = raw / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + gzip.decompress(victim.read_bytes())[4:]))
    _, magic, dims = D.FILES[victim.name]
    md5 = hashlib.md5(victim.read_bytes()).hexdigest()  # the md5 passes: the header is what is wrong
    monkeypatch.setitem(D.FILES, victim.name, (md5, magic, dims))
    with pytest.raises(D.DataError, match="IDX header says magic 2051"):
        D.load_mnist(tmp_path / "hdr")


def test_the_md5s_are_torchvisions_and_reading_the_data_never_imports_it(data_root: Path) -> None:
    from torchvision.datasets import MNIST

    assert {name: md5 for name, (md5, _, _) in D.FILES.items()} == dict(MNIST.resources)
    code = (
        "import sys; from pathlib import Path; from mnist_dist import data as D; "
        f"D.load_mnist(Path({str(data_root)!r}), allow_download=False); "
        "assert 'torchvision' not in sys.modules, 'torchvision was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_missing_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match=r"train-images-idx3-ubyte\.gz"):
        D.load_mnist(tmp_path / "empty", allow_download=False)


@pytest.mark.parametrize(
    ("n", "batch", "world", "accum"),
    [(1000, 64, 1, 1), (1000, 64, 2, 1), (1000, 64, 3, 1), (997, 50, 3, 2), (130, 64, 2, 1), (129, 64, 2, 1)],
)
def test_sampler_sees_every_sample_exactly_once_per_epoch(n: int, batch: int, world: int, accum: int) -> None:
    samplers = [D.ShardedSampler(n, batch, world, r, seed=7, accum=accum) for r in range(world)]
    steps = samplers[0].steps_per_epoch()
    assert steps == max(
        1, math.ceil(n / (batch * world * accum)) - (1 if 0 < n % (batch * world * accum) < world else 0)
    )
    for epoch in range(2):
        per_rank = [list(s.epoch(epoch)) for s in samplers]
        assert all(len(p) == steps for p in per_rank)
        seen = [int(i) for p in per_rank for micro, _ in p for mb in micro for i in mb]
        assert sorted(seen) == list(range(n))
        for step in range(steps):  # every rank has work and the same number of micro-batches
            assert len({len(p[step][0]) for p in per_rank}) == 1
            assert all(sum(len(mb) for mb in p[step][0]) > 0 for p in per_rank)
    assert not torch.equal(samplers[0].permutation(0), samplers[0].permutation(1))


def test_eval_shards_are_exact_for_any_world_size() -> None:
    for world in (1, 2, 3, 7):
        shards = [D.eval_shard(10_000, world, r) for r in range(world)]
        assert torch.equal(torch.cat(shards), torch.arange(10_000))


def test_augmentation_draws_a_fresh_angle_per_image_and_fills_zero() -> None:
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 4:24, 12:16] = 255  # a vertical bar
    out = D.augment(images, torch.Generator().manual_seed(0), rotate=7.0)
    assert out.shape == (64, 1, 28, 28) and out.dtype == torch.float32
    assert len({tuple(o.flatten().tolist()) for o in out}) > 8  # nearest: nearby angles may coincide
    smooth = D.augment(images, torch.Generator().manual_seed(0), rotate=7.0, interpolation="bilinear")
    assert len({tuple(o.flatten().tolist()) for o in smooth}) == 64  # a fresh angle for every image
    background = (0 - D.MEAN) / D.STD
    assert torch.allclose(out[:, :, 0, 0], torch.full((64, 1), background))
    plain = D.augment(images, torch.Generator().manual_seed(0), rotate=0.0)
    assert torch.equal(plain, D.normalize(images))
    same = D.augment(images, torch.Generator().manual_seed(0), rotate=7.0)
    assert torch.equal(out, same)  # reproducible from the generator
    shifted = D.augment(images, torch.Generator().manual_seed(1), rotate=0.0, translate=2.0)
    assert not torch.equal(shifted, plain)


def test_elastic_distortion_moves_pixels_smoothly_by_the_expected_amount() -> None:
    # A horizontal ramp: with bilinear sampling, each output value says which column it came from.
    ramp = (torch.arange(28) * 9).expand(256, 1, 28, 28).to(torch.uint8)
    plain = D.augment(ramp, torch.Generator().manual_seed(0), rotate=0.0, interpolation="bilinear")
    warped = D.augment(
        ramp, torch.Generator().manual_seed(0), rotate=0.0, interpolation="bilinear", elastic=34.0
    )
    dx = ((warped - plain) * D.STD * 255 / 9)[:, 0, 8:20, 8:20]  # columns moved, away from the border
    rms = dx.pow(2).mean().sqrt().item()
    assert 1.0 < rms < 1.7, rms  # sigma 4, alpha 34: about 1.34 px RMS per axis
    assert (dx[:, :, 1:] - dx[:, :, :-1]).pow(2).mean().sqrt() < rms / 4  # a smooth field, not noise
    again = D.augment(
        ramp, torch.Generator().manual_seed(0), rotate=0.0, interpolation="bilinear", elastic=34.0
    )
    assert torch.equal(warped, again)


def test_failed_download_names_the_file_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import MNIST

    from mnist_dist.launch import free_port

    monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{free_port()}/"])  # nobody listens there
    with pytest.raises(D.DataError, match=r"could not download train-images-idx3-ubyte\.gz .* Offline\?"):
        D.load_mnist(tmp_path / "new" / "root")
    assert list(tmp_path.iterdir()) == []
