"""Trained weights as a file another runtime loads: ONNX (onnxruntime), TorchScript or torch.export's
ExportedProgram, each checked when it is written.

The check loads the written file the way a user would and runs it on the 10,000 MNIST test images in
batches of several sizes (the batch dimension is dynamic); a file whose outputs differ from the eager
model's by more than ``TOLERANCE`` is removed, never left behind. The exported model is the eval-mode
fp32 model: it takes normalised images (N, 1, 28, 28), ``(pixel / 255 - MEAN) / STD``, and returns
log-probabilities (N, 10).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_dist import data as D
from mnist_dist import runfiles
from mnist_dist.config import default_data_dir
from mnist_dist.files import atomic_write
from mnist_dist.model import Net
from mnist_dist.weights import load_model

TOLERANCE = 1e-4  # max abs difference of log-probabilities allowed between the export and PyTorch
CHECK_BATCHES = (1000, 333)  # 333 leaves a last batch of 10 on 10,000 images: three sizes, plus 1
SAMPLE_BATCH = 2  # traced at batch 2: torch.export fixes a dimension it sees with size 1
EXTRA = "pip install -e '.[export]'"
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")  # the exporter needs the first two; the check the third

Runner = Callable[[torch.Tensor], torch.Tensor]


class ExportError(ValueError):
    """A request the user can fix (format, output path, missing extra); nothing was written."""


class ExportCheckError(RuntimeError):
    """The written export does not reproduce PyTorch's outputs; it was removed."""


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript works but warns on every call that PyTorch deprecates it; docs/export.md says so once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def _dynamic_batch() -> tuple[dict[int, torch.export.Dim], ...]:
    return ({0: torch.export.Dim("batch", min=1)},)


def _write_onnx(net: Net, sample: torch.Tensor, path: Path) -> None:
    """torch.onnx's dynamo exporter (the default and supported path; needs onnxscript), one
    self-contained file with the weights inside."""
    program = torch.onnx.export(
        net, (sample,), dynamo=True, dynamic_shapes=_dynamic_batch(), input_names=["images"],
        output_names=["log_probs"], verbose=False,
    )  # fmt: skip
    program.save(path, external_data=False)


def _load_onnx(path: Path) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _write_torchscript(net: Net, sample: torch.Tensor, path: Path) -> None:
    """Scripted, not traced: nothing about the sample batch is baked in."""
    with _quiet_jit():
        torch.jit.script(net).save(str(path))


def _load_torchscript(path: Path) -> Runner:
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu")
    return module


def _write_program(net: Net, sample: torch.Tensor, path: Path) -> None:
    """Through a file object: torch.export.save wants a path ending in .pt2; the temporary one does not."""
    program = torch.export.export(net, (sample,), dynamic_shapes=_dynamic_batch())
    with open(path, "wb") as f:
        torch.export.save(program, f)


def _load_program(path: Path) -> Runner:
    with open(path, "rb") as f:
        return torch.export.load(f).module()


@dataclass(frozen=True)
class Format:
    suffix: str
    write: Callable[[Net, torch.Tensor, Path], None]
    load: Callable[[Path], Runner]
    how_to_load: str  # Python that runs the file at {path} on a batch x
    needs: tuple[str, ...] = ()  # modules of the optional extra


FORMATS = {
    "onnx": Format(
        ".onnx", _write_onnx, _load_onnx,
        "onnxruntime.InferenceSession({path!r}).run(None, {{'images': x.numpy()}})[0]", ONNX_MODULES,
    ),
    "torchscript": Format(".pt", _write_torchscript, _load_torchscript, "torch.jit.load({path!r})(x)"),
    "exported-program": Format(
        ".pt2", _write_program, _load_program, "torch.export.load({path!r}).module()(x)"
    ),
}  # fmt: skip


@dataclass(frozen=True)
class ExportResult:
    format: str
    path: Path
    model: str
    bytes: int
    max_diff: float
    images: int
    batch_sizes: tuple[int, ...]

    def line(self) -> str:
        sizes = ", ".join(map(str, self.batch_sizes))
        return (
            f"{self.format}: {self.path} ({self.bytes / 1024:.1f} KiB, model {self.model}): max abs diff "
            f"{self.max_diff:.2g} vs PyTorch (<= {TOLERANCE:g}) on {self.images:,} test images, "
            f"batch sizes {sizes}"
        )

    def how_to_load(self) -> str:
        code = FORMATS[self.format].how_to_load.format(path=str(self.path))
        return f"load: {code}  # x: float32 (N, 1, 28, 28), (pixel / 255 - {D.MEAN}) / {D.STD}"


def format_spec(name: str) -> Format:
    """The format called ``name``, with its optional packages importable."""
    if name not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}; got {name!r}")
    spec = FORMATS[name]
    for module in spec.needs:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ExportError(f"--format {name} needs {module}, which is not installed: {EXTRA}") from None
    return spec


def output_path(weights: Path, spec: Format, out: Path | None, force: bool) -> Path:
    """``out``, or the weights file with the format's suffix (``<run>/model.onnx``); never the
    weights themselves, never an existing file unless ``force``."""
    source = Path(weights) / runfiles.WEIGHTS_FILE if Path(weights).is_dir() else Path(weights)
    target = Path(out) if out is not None else source.with_suffix(spec.suffix)
    if target.suffix != spec.suffix:
        raise ExportError(f"--out {str(target)!r} must end in {spec.suffix} for this format")
    if target.resolve() == source.resolve():
        raise ExportError(f"{target} is the weights file being exported; name another with --out")
    if not target.parent.is_dir():
        raise ExportError(f"--out {str(target)!r}: folder {target.parent} does not exist")
    if target.is_dir() or (target.exists() and not force):
        raise ExportError(f"{target} already exists; pass --force to replace it, or --out another file")
    return target


def verify(
    fmt: str, run: Runner, images: torch.Tensor, expected: torch.Tensor
) -> tuple[float, tuple[int, ...]]:
    """The largest difference from ``expected`` over every image, run in batches of each of
    ``CHECK_BATCHES`` and of one image, and the batch sizes that ran; raises when it is too large
    or when a batch size does not run."""
    sizes = sorted({1, *(len(c) for b in CHECK_BATCHES for c in images.split(b))}, reverse=True)
    diff = 0.0
    with torch.no_grad():
        for batch in (*CHECK_BATCHES, 1):
            chunks = images.split(batch) if batch > 1 else [images[:1]]
            try:
                got = torch.cat([run(c) for c in chunks])
            except Exception as e:  # whatever the runtime raises: the export does not take this batch
                raise ExportCheckError(
                    f"the {fmt} export fails on a batch of {batch}: {_first_line(e)}"
                ) from None
            want = expected[:1] if batch == 1 else expected
            if got.shape != want.shape:
                raise ExportCheckError(
                    f"the {fmt} export returns {list(got.shape)} on batches of {batch}, "
                    f"not {list(want.shape)}"
                )
            diff = max(diff, (got - want).abs().max().item())
    if not diff <= TOLERANCE:
        raise ExportCheckError(
            f"the {fmt} export does not reproduce PyTorch: max abs diff {diff:.3g} > {TOLERANCE:g} on "
            f"{len(images):,} test images (batch sizes {', '.join(map(str, sizes))})"
        )
    return diff, tuple(sizes)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def export_model(
    weights: Path,
    fmt: str,
    out: Path | None = None,
    *,
    model: str | None = None,
    force: bool = False,
    data_root: Path | None = None,
    data: D.MNISTArrays | None = None,
) -> ExportResult:
    """Write the checked export of the weights at ``weights`` (a run folder or a weights file).
    ``data`` replaces the MNIST files (tests pass small synthetic arrays)."""
    spec = format_spec(fmt)
    net, name = load_model(weights, model)
    target = output_path(weights, spec, out, force)
    arrays = data if data is not None else D.load_mnist(data_root or default_data_dir())
    images = D.normalize(arrays.test_images.unsqueeze(1))
    net = net.float().eval()
    with torch.no_grad():
        expected = torch.cat([net(c) for c in images.split(CHECK_BATCHES[0])])
    checked: list[tuple[float, tuple[int, ...]]] = []

    def write_checked(tmp: Path) -> None:
        spec.write(net, images[:SAMPLE_BATCH].clone(), tmp)  # a copy: a view would save all 10k images
        try:
            checked.append(verify(fmt, spec.load(tmp), images, expected))
        except ExportCheckError as e:
            raise ExportCheckError(f"{e}; {target} was not written") from None

    try:
        atomic_write(target, write_checked)
    except OSError as e:
        raise ExportError(f"cannot write {target}: {e.strerror or e}") from None
    diff, sizes = checked[0]
    return ExportResult(fmt, target, name, target.stat().st_size, diff, len(images), sizes)
