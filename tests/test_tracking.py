"""Tracking end to end: a real 2-rank CPU run with wandb offline, its run folder and pictures, the
report command, `--wandb disabled`, and the fall-back when the wandb server is unreachable.

    pytest tests/test_tracking.py     # about 3 minutes on 2 busy CPU cores; needs MNIST (MNIST_DATA_DIR)

wandb's records are read back with wandb's own reader of the .wandb transaction log
(`wandb leet inspect --json`), never by grepping its files.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mnist_dist import data as D
from mnist_dist import runfiles as R
from mnist_dist.cli import app
from mnist_dist.config import default_data_dir, from_preset
from mnist_dist.model import build_model, count_parameters
from mnist_dist.tracking import PROBE_SECONDS, probe_wandb_server

pytestmark = [
    pytest.mark.skipif(
        bool(D.missing_files(default_data_dir())), reason="MNIST not found (set MNIST_DATA_DIR)"
    ),
]
PICTURES = ("curves.png", "confusion_matrix.png", "misclassified.png")
EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds", "images_per_second")
DUMMY_KEY = "x" * 40  # well-formed, so wandb would try the server with it


def isolated_env(tmp: Path, **extra: str) -> dict[str, str]:
    """No wandb settings or credentials from the machine running the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp / "wandb-data"),
        NETRC=str(tmp / "no-netrc"),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def train(tmp: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mnist_dist.cli", "train", "--output-dir", str(tmp / "runs"), *args]
    return subprocess.run(
        cmd, cwd=tmp, env=env or isolated_env(tmp), capture_output=True, text=True, timeout=300
    )


def wandb_records(run_path: Path) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def wandb_summary(run_path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout)


# ---------------------------------------------------------------------- a real 2-rank offline run
@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("offline")
    result = train(
        tmp,
        *("--processes", "2", "--max-train-samples", "512", "--epochs", "2", "--log-every", "1"),
        *("--wandb", "offline", "--name", "two-ranks", "--wandb-tags", "ci, smoke"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp, tmp / "runs" / "two-ranks"


@pytest.mark.proof
def test_one_offline_run_holds_history_and_summary(offline_run: tuple[Path, Path]) -> None:
    tmp, run_dir = offline_run
    runs = sorted(tmp.rglob("offline-run-*"))
    assert runs == sorted((run_dir / "wandb").glob("offline-run-*")), (
        "a wandb run landed outside the run folder"
    )
    assert len(runs) == 1, f"expected one wandb run for 2 ranks, got {runs}"
    assert not (tmp / "wandb").exists()

    records = wandb_records(runs[0])
    run_record = next(r["run"] for r in records if r["type"] == "run")
    assert run_record["display_name"] == "two-ranks"
    assert run_record["project"] == "mnist-dist"
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    epochs = [h for h in history if "epoch/val_acc" in h]
    assert [h["epoch"] for h in epochs] == [1, 2]
    file_epochs = [
        m
        for m in map(json.loads, (run_dir / R.METRICS_FILE).read_text().splitlines())
        if m["kind"] == "epoch"
    ]
    for logged, written in zip(epochs, file_epochs, strict=True):
        for key in EPOCH_KEYS:
            assert logged[f"epoch/{key}"] == pytest.approx(written[key])
    steps = [h for h in history if "train/loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3, 4]  # 512 samples / (2 x 128) = 2 steps x 2 epochs
    assert all(h["train/lr"] > 0 and h["train/loss"] > 0 for h in steps)
    assert {k for h in history for k in h if k.startswith("plots/")} >= {
        f"plots/{p[:-4]}.path" for p in PICTURES
    }

    summary = json.loads((run_dir / R.SUMMARY_FILE).read_text())
    logged = wandb_summary(runs[0])
    assert logged["state"] == "finished"
    assert logged["config"]["max_train_samples"] == 512
    assert set(logged["tags"]) == {"ci", "smoke"}
    for key in ("test_acc", "best_epoch", "params", "world_size", "precision", "device", "code_version"):
        assert logged["summary"][key] == summary[key], key
    assert summary["world_size"] == 2
    default_model = build_model(from_preset("default").model)
    assert summary["params"] == count_parameters(default_model)
    assert 0 <= summary["test_acc"] <= 1 and summary["test_count"] == 10_000
    assert summary["wandb_mode"] == "offline"
    assert len(summary["code_version"].removesuffix("-dirty")) == 40  # the tests run from a git checkout


@pytest.mark.proof
def test_pictures_are_real_images(offline_run: tuple[Path, Path]) -> None:
    _, run_dir = offline_run
    for name in PICTURES:
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert 400 <= width <= 2000 and 300 <= height <= 1500, (name, image.size)
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 20, f"{name} looks blank"
        assert (run_dir / name).stat().st_size < 300_000


@pytest.mark.proof
def test_report_redraws_the_pictures_from_the_run_files(
    offline_run: tuple[Path, Path], tmp_path: Path
) -> None:
    _, run_dir = offline_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (R.METRICS_FILE, R.PREDICTIONS_FILE, R.SUMMARY_FILE):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    result = CliRunner().invoke(app, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    for name in PICTURES:
        with Image.open(run_dir / name) as original, Image.open(copy / name) as redrawn:
            assert redrawn.size == original.size
            assert redrawn.tobytes() == original.tobytes(), f"{name} differs when redrawn"


@pytest.mark.parametrize("kind", ["missing", "not a run", "no records", "corrupt"])
def test_report_refuses_a_bad_run_folder(tmp_path: Path, kind: str) -> None:
    run_dir = tmp_path / "run"
    if kind != "missing":
        run_dir.mkdir()
    metrics = {"no records": "", "corrupt": '{not json\n{"kind": "step", "step": 1}\n'}
    if kind in metrics:
        (run_dir / R.METRICS_FILE).write_text(metrics[kind])
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 2
    assert "Error:" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.rglob("*.png"))


# ---------------------------------------------------------------------- disabled: wandb never imported
@pytest.mark.proof
def test_disabled_never_imports_wandb(tmp_path: Path) -> None:
    script = f"""
import sys
from mnist_dist.cli import app
try:
    app(["train", "--wandb", "disabled", "--max-train-samples", "128", "--epochs", "1",
         "--output-dir", {str(tmp_path / "runs")!r}, "--name", "off"])
except SystemExit as e:
    assert not e.code, e.code
print("WANDB_MODULES", sorted(m for m in sys.modules if m == "wandb" or m.startswith("wandb.")))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "WANDB_MODULES []" in result.stdout
    run_dir = tmp_path / "runs" / "off"
    assert all((run_dir / name).is_file() for name in PICTURES)
    assert json.loads((run_dir / R.SUMMARY_FILE).read_text())["wandb_mode"] == "disabled"
    assert not list(tmp_path.rglob("wandb"))


# ---------------------------------------------------------------------- unreachable server
class _Answer(http.server.BaseHTTPRequestHandler):
    status = 200
    body = b""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def answering_server(status: int, body: dict) -> Iterator[str]:
    handler = type("Handler", (_Answer,), {"status": status, "body": json.dumps(body).encode()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


ANSWERS = {
    "rejects": (401, {"errors": [{"message": "bad key"}]}),
    "accepts": (200, {"data": {"viewer": {"id": "VXNlcjox"}}}),
}


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections (the kernel's backlog) and never answers: a hung wandb server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("where", ["silent", "closed", "rejects", "accepts"])
def test_probe_answers_within_seconds(
    where: str, silent_server: str, closed_port: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = {"silent": "did not answer", "closed": "unreachable", "rejects": "rejected", "accepts": None}
    with ExitStack() as stack:
        url = {"silent": silent_server, "closed": closed_port}.get(where) or stack.enter_context(
            answering_server(*ANSWERS[where])
        )
        monkeypatch.setenv("WANDB_BASE_URL", url)
        monkeypatch.setenv("WANDB_API_KEY", DUMMY_KEY)
        start = time.perf_counter()
        problem = probe_wandb_server()
        seconds = time.perf_counter() - start
    assert seconds < PROBE_SECONDS + 1.5
    if expected[where] is None:
        assert problem is None
    else:
        assert problem is not None and expected[where] in problem


TRACKER_SCRIPT = """
import json, sys, time
from pathlib import Path
from accelerate import Accelerator
from mnist_dist.config import TrainConfig
from mnist_dist.tracking import make_tracker, wandb_log_with

run_dir = Path(sys.argv[1])
run_dir.mkdir(exist_ok=True)
cfg = TrainConfig(wandb=sys.argv[2], name=run_dir.name, output_dir=str(run_dir.parent))
accelerator = Accelerator(cpu=True, log_with=wandb_log_with(cfg))
start = time.perf_counter()
tracker = make_tracker(accelerator, cfg, run_dir)
seconds = time.perf_counter() - start
tracker.log_epoch(1, {"train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5,
                      "images_per_second": 1.0})
tracker.close()
accelerator.end_training()
print("RESULT", json.dumps({"seconds": seconds, "mode": tracker.wandb_mode}))
"""


def start_tracker(tmp: Path, run_dir: Path, mode: str, **env: str) -> tuple[dict, str]:
    result = subprocess.run(
        [sys.executable, "-c", TRACKER_SCRIPT, str(run_dir), mode],
        cwd=tmp,
        env=isolated_env(tmp, **env),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), result.stderr


@pytest.mark.proof
def test_hung_server_falls_back_to_offline_within_seconds(tmp_path: Path, silent_server: str) -> None:
    """Without the probe, wandb.init would wait out its init_timeout (and retry past it)."""
    run_dir = tmp_path / "hung"
    result, stderr = start_tracker(
        tmp_path, run_dir, "online", WANDB_BASE_URL=silent_server, WANDB_API_KEY=DUMMY_KEY
    )
    assert result["mode"] == "offline"
    assert result["seconds"] < PROBE_SECONDS + 15, result  # probe + an offline wandb.init on a busy CPU
    assert stderr.count("mnist-dist: warning:") == 1, stderr
    assert "did not answer" in stderr and "wandb sync" in stderr
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.proof
def test_auto_without_credentials_is_offline_and_resume_keeps_the_run_id(tmp_path: Path) -> None:
    run_dir = tmp_path / "auto"
    first, stderr = start_tracker(tmp_path, run_dir, "auto")
    assert first["mode"] == "offline" and "mnist-dist: warning" not in stderr
    start_tracker(tmp_path, run_dir, "auto")  # a resumed training starts its tracker again
    ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert ids == {R.read_wandb_id(run_dir)}
