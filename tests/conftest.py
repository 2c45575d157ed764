"""Shared fixtures. The proofs read the real MNIST files: $MNIST_DATA_DIR (CI points it at the shared
data folder), else the user cache, where `mnist-dist download` puts them once. The fast tier trains on
synthetic digits in-process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from mnist_dist import data as D
from mnist_dist.config import default_data_dir


@pytest.fixture(scope="session", autouse=True)
def shared_compile_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One inductor cache for the session, in this process and every process the tests start. The
    proofs give each test's processes a TMPDIR of their own (it marks them), and inductor keeps its
    cache under TMPDIR: without this every compiled run would rebuild its graphs from nothing. Each
    graph's first build in a session is still a cold one; a given TORCHINDUCTOR_CACHE_DIR is kept."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor-cache"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = default_data_dir()
    if D.missing_files(root):
        try:  # a user's machine: downloaded once into the cache
            D.download(root)
        except D.DataError as e:
            pytest.fail(f"the tests need MNIST: {e}")
    return root


@pytest.fixture(scope="session")
def mnist(data_root: Path) -> D.MNISTArrays:
    return D.load_mnist(data_root, allow_download=False)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, dict]:
    """One short real training shared by the proofs that need real weights (evaluate, predict,
    export): the reference recipe on 16,000 real images for 2 epochs, one thread. Weaker weights
    hesitate over many digits, and then any change of their pixels flips some of them."""
    from mnist_dist.config import from_preset
    from mnist_dist.trainer import train

    out = tmp_path_factory.mktemp("real-run")
    cfg = from_preset(
        "reference", max_train_samples=16_000, epochs=2, log_every=10, data_dir=str(data_root),
        wandb="disabled", threads=1, output_dir=str(out), name="run",
    )  # fmt: skip
    return out / "run", train(cfg)


@pytest.fixture(scope="session")
def few_step_run(tmp_path_factory: pytest.TempPathFactory, mnist: D.MNISTArrays) -> Path:
    """A run folder of Net weights after a few steps on real digits, right on some and unsure or wrong
    on others (evaluate's and TTA's proofs: changing how an image is scored then changes counts)."""
    from mnist_dist.config import TrainConfig
    from mnist_dist.model import build_model
    from mnist_dist.runfiles import WEIGHTS_FILE, write_config
    from mnist_dist.weights import save_weights

    folder = tmp_path_factory.mktemp("few-steps") / "run"
    folder.mkdir()
    torch.manual_seed(0)
    net = build_model("net").train()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    x, y = D.normalize(mnist.train_images[:512].unsqueeze(1)), mnist.train_labels[:512]
    for _ in range(10):
        optimizer.zero_grad()
        torch.nn.functional.nll_loss(net(x), y).backward()
        optimizer.step()
    save_weights(net, folder / WEIGHTS_FILE)
    write_config(folder, TrainConfig(model="net"))
    return folder


def synthetic_digits(seed: int = 0) -> D.MNISTArrays:
    """MNIST-shaped uint8 arrays (a tenth of MNIST: 6,000 train, 1,000 test) on a noisy background,
    whose class is a striped patch: horizontal or vertical stripes, 1 to 5 pixels wide. Local
    features a small convnet learns in a few steps, so the loop's logic is tested without the files."""
    g = torch.Generator().manual_seed(seed)
    coord = torch.arange(14)
    patches = torch.stack(
        [((coord // (1 + c // 2)) % 2 == 0).expand(14, 14) for c in range(10)]
    )  # stripes across the rows ...
    patches[1::2] = patches[1::2].transpose(1, 2)  # ... or the columns

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
        images[:, 7:21, 7:21][patches[labels]] = 255
        return images, labels

    (train_x, train_y), (test_x, test_y) = make(6_000), make(1_000)
    return D.MNISTArrays(train_x, train_y, test_x, test_y)


@pytest.fixture(scope="session")
def digits() -> D.MNISTArrays:
    return synthetic_digits()


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps one process-wide state; each in-process run starts from a clean one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def cli(*args: str, **kwargs: object) -> object:
    """Kept for tests not yet moved to tests/helpers.py."""
    from .helpers import cli as run

    return run(*args, **kwargs)  # type: ignore[arg-type]
