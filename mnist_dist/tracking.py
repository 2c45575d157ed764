"""Rank-zero run records: the run folder's files and the wandb run, both written by the main process.

This is the one place that decides who writes: ``make_tracker`` gives the main process a
``RunTracker`` and every other rank a ``NullTracker`` that does nothing, so the training loop
never asks which rank it is before logging.

Run folder: the files of ``mnist_dist.runfiles`` (config, metrics, summary, validation predictions), the
PNGs of ``mnist_dist.plots`` and, unless ``--wandb disabled``, ``wandb/`` (offline runs:
``wandb sync <run_dir>/wandb/offline-run-*``).

wandb goes through Accelerate's tracker (``log_with="wandb"``). It must never stall or kill training: an
online run is started only after a quick probe of the server answers, and anything that fails falls back
to offline (or to the files alone) with one warning. ``--wandb disabled`` never imports wandb.
"""

from __future__ import annotations

import json
import netrc
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from accelerate import Accelerator
from tqdm.auto import tqdm

from mnist_dist import env, runfiles
from mnist_dist.config import TrainConfig

PROBE_SECONDS = 4.0  # the longest an unreachable wandb server may delay the start of training
INIT_TIMEOUT = 30.0  # backstop if the server answered the probe but wandb.init still hangs
FINISH_TIMEOUT = 60.0  # an outage at the end leaves the rest on disk for `wandb sync`, not a hang


class NullTracker:
    """What non-main ranks get: every call is a no-op."""

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def print(self, message: str) -> None:
        pass

    def finish(self, summary: dict[str, Any], artifacts: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class RunTracker(NullTracker):
    """Writes the run folder, and the wandb run when there is one, on the main process."""

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, run_dir: Path) -> None:
        self.accelerator, self.cfg, self.run_dir = accelerator, cfg, run_dir
        runfiles.write_config(run_dir, cfg)
        self._metrics = runfiles.MetricsLog(run_dir)
        self.code_version = code_version()
        self.wandb_mode, self.wandb_run = start_wandb(accelerator, cfg, run_dir)
        self._finished = False

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._metrics.write({"kind": "step", "step": step, **metrics})
        if self.wandb_run is not None:
            named = {k if "/" in k else f"train/{k}": v for k, v in metrics.items()}
            self.accelerator.log({"step": step, **named})

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._metrics.write({"kind": "epoch", "epoch": epoch, **metrics})
        if self.wandb_run is not None:
            named = {f"epoch/{k}": v for k, v in metrics.items() if k != "epoch"}
            self.accelerator.log({"epoch": epoch, **named})
        self.print(
            f"epoch {epoch:>2}/{self.cfg.epochs}  train loss {metrics['train_loss']:.4f} acc "
            f"{100 * metrics['train_acc']:.2f}%  val loss {metrics['val_loss']:.4f} acc "
            f"{100 * metrics['val_acc']:.2f}%  {metrics['images_per_second']:,.0f} img/s"
        )

    def print(self, message: str) -> None:
        tqdm.write(message)

    def finish(self, summary: dict[str, Any], artifacts: dict[str, Any]) -> None:
        """Write summary.json, the validation predictions and the pictures; send them to wandb.

        artifacts: ``val_predictions`` and ``val_labels`` (N,) and ``val_images`` (N, 1, 28, 28) uint8,
        all in validation-split order.
        """
        from mnist_dist import plots  # matplotlib loads only in the process that draws

        summary = {**summary, "code_version": self.code_version, "wandb_mode": self.wandb_mode}
        runfiles.write_summary(self.run_dir, summary)
        runfiles.save_val_predictions(
            self.run_dir, artifacts["val_labels"], artifacts["val_predictions"], artifacts["val_images"]
        )
        pictures, _ = plots.render_run(self.run_dir)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in pictures})
            self.wandb_run.summary.update(summary)
        self._finished = True

    def close(self) -> None:
        """Close the files and end the wandb run, marked failed if training never reached finish()."""
        self._metrics.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=0 if self._finished else 1)


def make_tracker(accelerator: Accelerator, cfg: TrainConfig, run_dir: Path) -> NullTracker:
    """The main process records the run; every other rank gets the do-nothing tracker."""
    if not accelerator.is_main_process:
        return NullTracker()
    return RunTracker(accelerator, cfg, run_dir)


# ------------------------------------------------------------------ code version
def code_version() -> str:
    """The git commit of the code that ran (``-dirty`` with local changes), else the package version."""
    src = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(src), *args], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        from mnist_dist import __version__

        return f"mnist-dist {__version__}"  # run from an unpacked copy: no git, maybe not installed
    return commit + ("-dirty" if dirty else "")


# ------------------------------------------------------------------ wandb
def wandb_log_with(cfg: TrainConfig) -> str | None:
    """Accelerator(log_with=...): None when wandb is off, so that wandb is never even imported."""
    return None if resolve_wandb_mode(cfg.wandb) == "disabled" else "wandb"


def resolve_wandb_mode(requested: str) -> str:
    """auto: $WANDB_MODE when set, else online with credentials (WANDB_API_KEY or netrc), else offline."""
    if requested != "auto":
        return requested
    env_mode = os.environ.get(env.WANDB_MODE, "").lower()
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    return "online" if wandb_api_key() else "offline"


def wandb_base_url() -> str:
    return os.environ.get(env.WANDB_BASE_URL, "https://api.wandb.ai").rstrip("/")


def wandb_api_key() -> str | None:
    """The key wandb would use: $WANDB_API_KEY, else the netrc entry `wandb login` wrote for the host."""
    if key := os.environ.get(env.WANDB_API_KEY):
        return key
    try:
        auth = netrc.netrc(os.environ.get(env.NETRC) or None).authenticators(
            urlparse(wandb_base_url()).hostname
        )
    except (OSError, netrc.NetrcParseError):
        return None
    return auth[2] if auth else None


def probe_wandb_server(timeout: float = PROBE_SECONDS) -> str | None:
    """Ask the server who we are, within ``timeout`` seconds in all (DNS included, hence the thread).

    Returns None when the server accepts the key, else why online logging cannot work. wandb.init
    itself retries until ``init_timeout`` (90 s) and past it: with init_timeout=5 it took 16 s here.
    """
    key = wandb_api_key()
    if not key:
        return "no API key (run `wandb login` or set WANDB_API_KEY)"
    url = wandb_base_url() + "/graphql"
    request = urllib.request.Request(
        url,
        data=json.dumps({"query": "query Viewer { viewer { id } }"}).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + b64encode(f"api:{key}".encode()).decode(),
        },
    )
    answer: list[str | None] = []

    def ask() -> None:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                viewer = (json.load(response).get("data") or {}).get("viewer")
            answer.append(None if viewer else "the server did not accept the API key")
        except urllib.error.HTTPError as e:
            answer.append("the API key was rejected" if e.code in (401, 403) else f"HTTP {e.code} from {url}")
        except (OSError, ValueError) as e:
            answer.append(f"{url} unreachable ({getattr(e, 'reason', e)})")

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else f"{url} did not answer within {timeout:.0f} s"


def start_wandb(accelerator: Accelerator, cfg: TrainConfig, run_dir: Path) -> tuple[str, Any]:
    """Start the run's one wandb run through Accelerate; return (mode used, wandb Run or None).

    Falls back online → offline → files only, with one warning, instead of failing the training.
    """
    mode = resolve_wandb_mode(cfg.wandb)
    if mode == "disabled":
        return "disabled", None
    import wandb

    problem = probe_wandb_server() if mode == "online" else None
    modes = ["offline"] if mode == "offline" or problem else ["online", "offline"]
    run_id = runfiles.read_wandb_id(run_dir)  # a resumed training continues the same wandb run
    resume = {"id": run_id, "resume": "allow"} if run_id else {}
    for attempt in modes:
        try:
            accelerator.init_trackers(
                cfg.wandb_project,
                config=cfg.to_dict(),
                init_kwargs={
                    "wandb": {
                        "mode": attempt,
                        "dir": str(run_dir),
                        "name": run_dir.name,
                        "entity": cfg.wandb_entity,
                        "group": cfg.wandb_group,
                        "tags": [t.strip() for t in (cfg.wandb_tags or "").split(",") if t.strip()],
                        "job_type": "train",
                        "settings": wandb.Settings(init_timeout=INIT_TIMEOUT, finish_timeout=FINISH_TIMEOUT),
                        **resume,
                    }
                },
            )
            run = accelerator.get_tracker("wandb", unwrap=True)
            run.define_metric("step")
            run.define_metric("train/*", step_metric="step")
            run.define_metric("epoch")
            run.define_metric("epoch/*", step_metric="epoch")
        except Exception as e:  # never let tracking kill the training
            accelerator.trackers.clear()  # drop the half-started tracker before trying again
            problem = f"wandb {attempt} failed to start ({type(e).__name__}: {e})"
            continue
        runfiles.write_wandb_id(run_dir, run.id)
        if problem:
            _warn(
                f"wandb online logging unavailable: {problem}. Logging offline instead; upload later "
                f"with: wandb sync {run_dir}/wandb/offline-run-*"
            )
        return attempt, run
    _warn(f"{problem}. Training continues; the run folder {run_dir} keeps every metric.")
    return "failed", None


def _warn(message: str) -> None:
    tqdm.write(f"mnist-dist: warning: {message}", file=sys.stderr)
