"""The headline claim, on the real data: one full run of the default preset reaches the target
final-epoch validation accuracy (never the best epoch). Takes about 20 minutes on 2 CPU cores;
`pytest -m "not slow"` skips it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .helpers import cli

TARGET = 0.9940


@pytest.mark.slow
@pytest.mark.proof
def test_default_preset_clears_the_target(tmp_path: Path, data_root: Path) -> None:
    result = cli("train", "--seed", "1", "--output-dir", str(tmp_path), "--name", "default", timeout=5400)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    print(json.dumps(summary, indent=2))
    assert summary["preset"] == "default" and summary["epochs"] == 19 and summary["params"] < 20_000
    assert summary["val_acc"] >= TARGET, f"final-epoch validation accuracy {summary['val_acc']:.4f}"
