"""--deterministic: the settings chosen for a GPU (set here without one: they are flags), and the ops
the loop runs, read on the CPU: none is an op torch has no deterministic CUDA kernel for, so
--deterministic on a GPU neither raises nor warns. No GPU runs these tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._ops import OpOverload
from torch.utils._python_dispatch import TorchDispatchMode

from mnist_dist import env
from mnist_dist import trainer as T
from mnist_dist.config import ConfigError, from_preset
from mnist_dist.data import MNISTArrays
from mnist_dist.distributed import set_determinism

# The ops of torch.use_deterministic_algorithms' list of those that raise on CUDA (read in the
# installed torch's docstring), by the aten names a dispatch trace shows.
NO_DETERMINISTIC_CUDA_KERNEL = {
    "aten.avg_pool3d_backward", "aten._adaptive_avg_pool2d_backward", "aten._adaptive_avg_pool3d_backward",
    "aten.adaptive_max_pool2d_backward", "aten.fractional_max_pool2d_backward",
    "aten.fractional_max_pool3d_backward", "aten.max_unpool2d", "aten.max_unpool3d",
    "aten.upsample_linear1d_backward", "aten.upsample_bilinear2d_backward",
    "aten.upsample_bicubic2d_backward", "aten.upsample_trilinear3d_backward",
    "aten.reflection_pad1d_backward", "aten.reflection_pad2d_backward", "aten.reflection_pad3d_backward",
    "aten.nll_loss2d_forward", "aten.nll_loss2d_backward", "aten._ctc_loss_backward",
    "aten._embedding_bag_backward", "aten.put", "aten.put_", "aten.histc", "aten.bincount",
    "aten.median", "aten.grid_sampler_2d_backward", "aten.scatter_reduce",
}  # fmt: skip


class Ops(TorchDispatchMode):
    """Records the name of every aten op dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(
        self, func: OpOverload, types: tuple[type, ...], args: tuple = (), kwargs: dict | None = None
    ) -> object:
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def ops(run: Callable[[], object]) -> set[str]:
    with Ops() as recorder:
        run()
    return recorder.names


@pytest.fixture
def torch_flags(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """set_determinism changes process-wide settings: they come back afterwards."""
    monkeypatch.setenv(env.CUBLAS_WORKSPACE_CONFIG, "")
    monkeypatch.delenv(env.CUBLAS_WORKSPACE_CONFIG)  # unset now, and again after the test
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]


def test_on_a_gpu_ops_without_a_deterministic_kernel_warn_and_cublas_gets_a_fixed_workspace(
    torch_flags: None,
) -> None:
    torch.backends.cudnn.benchmark = True
    set_determinism(True, torch.device("cuda"))
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ[env.CUBLAS_WORKSPACE_CONFIG] == ":4096:8"
    assert torch.backends.cudnn.benchmark is False


def test_on_the_cpu_an_op_without_a_deterministic_kernel_raises(torch_flags: None) -> None:
    set_determinism(True, torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert env.CUBLAS_WORKSPACE_CONFIG not in os.environ


def test_a_users_cublas_workspace_is_kept_or_refused(
    torch_flags: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env.CUBLAS_WORKSPACE_CONFIG, ":16:8")
    set_determinism(True, torch.device("cuda"))
    assert os.environ[env.CUBLAS_WORKSPACE_CONFIG] == ":16:8"
    monkeypatch.setenv(env.CUBLAS_WORKSPACE_CONFIG, ":1:1")
    with pytest.raises(
        ConfigError, match=r"CUBLAS_WORKSPACE_CONFIG unset or one of :4096:8, :16:8; got ':1:1'"
    ):
        set_determinism(True, torch.device("cuda"))


def test_without_deterministic_nothing_changes(torch_flags: None) -> None:
    torch.use_deterministic_algorithms(False)
    set_determinism(False, torch.device("cuda"))
    assert not torch.are_deterministic_algorithms_enabled()
    assert env.CUBLAS_WORKSPACE_CONFIG not in os.environ


def backward(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: module(x.requires_grad_()).sum().backward()


@pytest.mark.parametrize(
    ("run", "dispatched", "flagged"),
    [
        # Net's global average pool: AdaptiveAvgPool2d(1) is computed as a mean, so its backward is
        # the mean's (an expand), never the CUDA kernel with atomic adds.
        (backward(nn.AdaptiveAvgPool2d(1), torch.randn(4, 10, 7, 7)), "aten.mean", False),
        (backward(nn.AdaptiveAvgPool2d(2), torch.randn(4, 10, 7, 7)), "aten._adaptive_avg_pool2d", True),
        # NLLLoss raises on CUDA for images of class scores (nll_loss2d), not for a batch of vectors.
        (lambda: F.nll_loss(torch.randn(4, 10), torch.zeros(4, dtype=torch.long)), "aten.nll_loss_forward", False),
        (lambda: F.nll_loss(torch.randn(4, 10, 2, 2), torch.zeros(4, 2, 2, dtype=torch.long)),
         "aten.nll_loss2d_forward", True),
    ],
    ids=["gap-1x1", "adaptive-pool-2x2", "nll-loss", "nll-loss-2d"],
)  # fmt: skip
def test_the_trace_tells_the_ops_with_and_without_a_deterministic_cuda_kernel(
    run: Callable[[], object], dispatched: str, flagged: bool
) -> None:
    names = ops(run)
    assert dispatched in names
    assert bool(names & NO_DETERMINISTIC_CUDA_KERNEL) is flagged


@pytest.mark.parametrize(
    ("preset", "options"),
    [("default", {}), ("reference", {"label_smoothing": 0.1, "channels_last": True, "ema": 0.9})],
    ids=["default", "reference-smoothing-channels-last-ema"],
)
def test_a_train_step_and_evaluation_run_no_op_without_a_deterministic_cuda_kernel(
    tmp_path: Path, digits: MNISTArrays, preset: str, options: dict[str, object]
) -> None:
    cfg = from_preset(
        preset, epochs=1, max_train_samples=256, output_dir=str(tmp_path), name="r", wandb="disabled",
        threads=1, deterministic=True, **options,
    )  # fmt: skip
    trainer = T.Trainer(cfg, data=digits)
    try:
        micro_batches, global_n = next(iter(trainer.sampler.epoch(0, 0, trainer.device)))
        names = ops(lambda: (trainer.train_step(micro_batches, global_n), trainer.evaluate("val")))
    finally:
        trainer.close()
    assert {"aten.convolution_backward", "aten.nll_loss_backward", "aten.mean"} <= names  # it traced a step
    assert not names & NO_DETERMINISTIC_CUDA_KERNEL
