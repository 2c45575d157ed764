"""Net: exact parameter count, reference module names, receptive fields computed from the module."""

from __future__ import annotations

import torch
from torch import nn
from typer.testing import CliRunner

from mnist_dist.cli import app
from mnist_dist.model import MODELS, Net, build_model, count_parameters, summary, summary_rows


class ReferenceNet(nn.Module):
    """The reference design's own class, as its author wrote it (layers and names)."""

    def __init__(self) -> None:
        super().__init__()
        self.convblock1 = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.convblock2 = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.pool1 = nn.MaxPool2d(2, 2)
        self.convblock3 = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.convblock4 = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.pool2 = nn.MaxPool2d(2, 2)
        self.convblock5 = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.1)
        )
        self.convblock6 = nn.Sequential(nn.Conv2d(16, 10, 1, bias=False))
        self.gap = nn.AdaptiveAvgPool2d(1)


def test_net_has_8440_parameters_and_the_reference_layout() -> None:
    net = Net()
    assert count_parameters(net) == 8440
    assert count_parameters(build_model("net")) == 8440
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert [type(m).__name__ for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.Dropout))].count(
        "BatchNorm2d"
    ) == 5
    assert isinstance(net.gap, nn.AdaptiveAvgPool2d)


def test_every_model_stays_under_20k_parameters() -> None:
    counts = {name: count_parameters(build_model(name)) for name in MODELS}
    assert counts == {
        "net": 8440, "net_wide": 18708, "net_wider": 19616, "net_w24x23": 19929, "net_w8x25": 19213,
    }  # fmt: skip


def test_reference_state_dict_loads_unchanged() -> None:
    ref = ReferenceNet()
    missing, unexpected = Net().load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected


def test_receptive_fields_follow_the_module() -> None:
    stage_rf = [r["rf"] for r in summary_rows(Net()) if r["layer"].startswith(("Conv2d", "MaxPool2d"))]
    assert stage_rf == ["3", "5", "6", "10", "14", "16", "24", "24"]
    # Change a kernel and the column changes with it: nothing is typed in.
    net = Net()
    net.pool1 = nn.MaxPool2d(3, 3)
    changed = [r["rf"] for r in summary_rows(net) if r["layer"].startswith("MaxPool2d")]
    assert changed[0] == "7"


def test_summary_command_prints_table_with_totals() -> None:
    result = CliRunner().invoke(app, ["summary"])
    assert result.exit_code == 0, result.output
    assert "Total params: 8,440" in result.output
    assert "Trainable params: 8,440" in result.output
    assert "[-1, 16, 7, 7]" in result.output
    assert summary(Net()).splitlines()[3].split()[-1] == "3"


def test_summary_of_each_model_and_a_refused_name() -> None:
    wider = CliRunner().invoke(app, ["summary", "--model", "net_wider"])
    assert wider.exit_code == 0 and "Total params: 19,616" in wider.output
    bad = CliRunner().invoke(app, ["summary", "--model", "resnet"])
    assert (
        bad.exit_code == 2
        and "--model must be one of net, net_wide, net_wider, net_w24x23, net_w8x25; got 'resnet'"
        in bad.output
    )
