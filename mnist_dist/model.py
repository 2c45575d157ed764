"""Net, the reference design's 8,440-parameter CNN, and its summary table with receptive fields.

Module names match the reference code (convblock1..6, pool1, pool2, gap), so a state dict saved by
the reference design loads here unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnist_dist.spec import MODELS


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Net(nn.Module):
    """conv(1→8) conv(8→16) pool conv(16→16) conv(16→16) pool conv(16→16)+dropout conv1x1(16→10) GAP.

    ``width1``/``width2`` exist only for the wider second model (``net_wide``); the defaults are
    the reference design, exactly.
    """

    def __init__(self, width1: int = 8, width2: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.convblock1 = _conv_bn_relu(1, width1)
        self.convblock2 = _conv_bn_relu(width1, width2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.convblock3 = _conv_bn_relu(width2, width2)
        self.convblock4 = _conv_bn_relu(width2, width2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.convblock5 = nn.Sequential(*_conv_bn_relu(width2, width2), nn.Dropout(dropout))
        self.convblock6 = nn.Sequential(nn.Conv2d(width2, 10, 1, bias=False))
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.convblock2(self.convblock1(x)))
        x = self.pool2(self.convblock4(self.convblock3(x)))
        x = self.gap(self.convblock6(self.convblock5(x)))
        return F.log_softmax(x.view(-1, 10), dim=-1)


def build_model(name: str = "net") -> Net:
    """A model by name; 'net' is the reference design."""
    return Net(**MODELS[name])


def compiled(net: nn.Module, cuda_graph: bool = False) -> nn.Module:
    """``net`` under torch.compile as the training loop and the bench's bare step run it.

    Static shapes: the short last batch gets a graph of its own, so a step's arithmetic does not
    depend on which shapes came first (a resumed run compiles in another order). Dropout draws from
    torch's generator as in eager mode (not inductor's own), so compiling changes rounding, not the
    random masks. ``cuda_graph`` is mode reduce-overhead's option, given as an option because
    torch.compile takes a mode or options, not both.
    """
    options = {"fallback_random": True, "triton.cudagraphs": cuda_graph}
    return torch.compile(net, dynamic=False, options=options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _as_int(v: int | tuple[int, ...]) -> int:
    return v[0] if isinstance(v, tuple) else v


def summary_rows(model: nn.Module, input_size: tuple[int, int, int] = (1, 28, 28)) -> list[dict]:
    """One row per leaf module in forward order: type, output shape, params, receptive field.

    The receptive field is propagated through each conv/pool's kernel and stride (rf += (k-1)*jump,
    jump *= stride), so it follows the module rather than being typed in.
    """
    rows: list[dict] = []
    state = {"rf": 1, "jump": 1}

    def hook(module: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s = _as_int(module.kernel_size), _as_int(module.stride)
            state["rf"] += (k - 1) * state["jump"]
            state["jump"] *= s
        rf = "global" if isinstance(module, nn.AdaptiveAvgPool2d) else str(state["rf"])
        rows.append(
            {
                "layer": f"{type(module).__name__}-{len(rows) + 1}",
                "shape": [-1, *out.shape[1:]],
                "params": sum(p.numel() for p in module.parameters(recurse=False)),
                "rf": rf,
            }
        )

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return rows


def summary(model: nn.Module | None = None) -> str:
    """The layer table users know from the reference design, plus a receptive-field column."""
    model = model if model is not None else Net()
    rows = summary_rows(model)
    line = "-" * 72
    out = [line, f"{'Layer (type)':>22} {'Output Shape':>22} {'Param #':>14} {'RF':>10}", "=" * 72]
    for r in rows:
        out.append(f"{r['layer']:>22} {r['shape']!s:>22} {r['params']:>14,} {r['rf']:>10}")
    total = sum(p.numel() for p in model.parameters())
    trainable = count_parameters(model)
    out += [
        "=" * 72,
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
        line,
    ]
    return "\n".join(out)
