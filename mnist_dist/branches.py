"""Training-time over-parameterisation, folded away (ACNet, Ding et al. 2019; RepVGG).

``branched(net)`` trains each 3x3 conv + BatchNorm of a Net as four parallel conv + BatchNorm
branches (3x3, 1x3, 3x1, 1x1), summed before the block's ReLU. All four are linear in eval mode
and each smaller kernel reads a centred part of the 3x3 window, so ``fold`` rewrites the sum
exactly as one 3x3 conv and one BatchNorm: the plain Net, with its plain state dict, which every
reader of weights takes unchanged. Module names carry over (``convblock1.0.k3x3.conv.weight``), so a
branched checkpoint reads like the plain model's.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from mnist_dist.model import Net

KERNELS = {"k3x3": (3, 3), "k1x3": (1, 3), "k3x1": (3, 1), "k1x1": (1, 1)}
_FULL = KERNELS["k3x3"]


class ConvBN(nn.Sequential):
    """One branch: a conv (centred padding, so every branch keeps the image size) and its BatchNorm."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kernel zero-padded to 3x3, bias) of this branch in eval mode, in float64."""
        bn = self.bn
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        kernel = self.conv.weight.double() * scale.view(-1, 1, 1, 1)
        (kh, kw), (fh, fw) = kernel.shape[-2:], _FULL
        pad_h, pad_w = (fh - kh) // 2, (fw - kw) // 2
        bias = bn.bias.double() - bn.running_mean.double() * scale
        return F.pad(kernel, (pad_w, pad_w, pad_h, pad_h)), bias


def _like(conv: nn.Conv2d, bn: nn.BatchNorm2d, kernel: tuple[int, int]) -> ConvBN:
    """A new branch of ``kernel``'s size with the widths, device and dtype of ``conv`` and ``bn``."""
    like = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    padding = (kernel[0] // 2, kernel[1] // 2)
    return ConvBN(
        nn.Conv2d(conv.in_channels, conv.out_channels, kernel, padding=padding, bias=False, **like),
        nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, **like),
    )


class Branches(nn.ModuleDict):
    """A 3x3 conv + BatchNorm trained as the sum of the branches of ``KERNELS``; the 3x3 branch is
    the plain block's own conv and BatchNorm, the others new ones of the same widths."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__(
            {
                name: ConvBN(conv, bn) if kernel == _FULL else _like(conv, bn, kernel)
                for name, kernel in KERNELS.items()
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = iter(self.values())
        out = next(branches)(x)
        for branch in branches:
            out = out + branch(x)
        return out

    @torch.no_grad()
    def folded(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        """One plain conv (the branches' kernels summed) and a BatchNorm that adds their summed bias:
        mean 0, variance 1 and weight sqrt(1 + eps) make it the identity plus its bias."""
        kernels, biases = zip(*(branch.folded() for branch in self.values()), strict=True)
        plain = self["k3x3"]
        conv, bn = copy.deepcopy(plain.conv), copy.deepcopy(plain.bn)  # kinds, sizes, layout, eps
        conv.weight.copy_(sum(kernels))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(math.sqrt(1.0 + bn.eps))
        bn.bias.copy_(sum(biases))
        return conv, bn


def _is_plain_block(block: nn.Module) -> bool:
    """A Sequential that opens with a 3x3 conv and its BatchNorm (the 1x1 output conv is not one)."""
    return (
        isinstance(block, nn.Sequential)
        and len(block) >= 2
        and isinstance(block[0], nn.Conv2d)
        and block[0].kernel_size == _FULL
        and isinstance(block[1], nn.modules.batchnorm._BatchNorm)
    )


def _is_branched_block(block: nn.Module) -> bool:
    return isinstance(block, nn.Sequential) and len(block) >= 1 and isinstance(block[0], Branches)


def branched(net: Net) -> Net:
    """The training form of ``net``: a copy whose 3x3 conv + BatchNorm blocks are ``Branches``,
    followed by the block's own ReLU (and Dropout). ``net`` itself is left as it is."""
    out = copy.deepcopy(net)
    for name, block in list(out.named_children()):
        if _is_plain_block(block):
            setattr(out, name, nn.Sequential(Branches(block[0], block[1]), *block[2:]))
    return out


def fold(module: Net) -> Net:
    """The plain Net that computes what the branched ``module`` computes in eval mode, as a new
    module (``module`` is left as it is); on its device, in its dtype and memory layout."""
    out = copy.deepcopy(module)
    for name, block in list(out.named_children()):
        if _is_branched_block(block):
            setattr(out, name, nn.Sequential(*block[0].folded(), *block[1:]))
    return out
