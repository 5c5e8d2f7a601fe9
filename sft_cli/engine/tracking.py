"""Experiment trackers (`output.report_to`): Accelerate's tracker integrations, never a crash mid-run.

Every metrics.jsonl row goes to each tracker with its step; the resolved recipe is logged once as params; the
run's pictures go up as artifacts at the end. A tracker that cannot start is a one-line warning (an error with
`output.tracker_required`); one that fails later is dropped with a warning and training goes on.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
import socket
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from sft_cli.errors import SftError
from sft_cli.rundir import manifest
from sft_cli.rundir.atomic import write_json_atomic

log = logging.getLogger("sft")

TRACKERS_FILE = "trackers.json"  # the run ids, so --resume and `sft eval` continue the same tracker runs
ARTIFACTS = ("report.png", "confusion_matrix.png", "samples.png", "eval.json", "summary.json", "samples")


def requested(output: Any) -> list[str]:
    """The trackers a recipe asks for: output.report_to, plus tensorboard for output.tensorboard: true."""
    names = list(dict.fromkeys(output.report_to))
    if output.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """A nested recipe as `section.key` params; lists and dicts a tracker cannot hold become JSON text; characters
    trackers refuse in names (MLflow: letters, digits, _ - . / and space) become _."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = re.sub(r"[^\w\-./ ]", "_", f"{prefix}{key}")
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, dict)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


class Trackers:
    """The run's trackers, started once on the main process; each call survives a tracker that fails."""

    def __init__(self, output: Any, run_dir: Path, run_name: str, resume: bool = False):
        self.output, self.run_dir, self.run_name = output, run_dir, run_name
        self.names = requested(output)
        self.active: dict[str, Any] = {}
        self.ids: dict[str, dict[str, Any]] = {}
        self.previous = self._previous_ids() if resume else {}

    def _previous_ids(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads((self.run_dir / TRACKERS_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def start(self, params: dict[str, Any]) -> None:
        """Start every requested tracker and log the recipe as params; unreachable ones warn (or fail)."""
        for name in self.names:
            tracker = None
            try:
                tracker = self._start(name)
                identity = self._identity(name, tracker)
            except Exception as err:  # a tracker's own failure (network, auth, bad option) must not stop training
                why = str(err) if isinstance(err, SftError) else f"{type(err).__name__}: {_short(err)}"
                _close(tracker)
                self._unreachable(name, why)
                continue
            self.active[name], self.ids[name] = tracker, identity
            if name not in self.previous:  # a continued run already has them (MLflow refuses changed values)
                try:
                    tracker.store_init_configuration(params)
                except Exception as err:
                    log.warning("output.report_to: %s did not take the recipe as params (%s)", name, _short(err))
        if self.ids:
            write_json_atomic(self.run_dir / TRACKERS_FILE, {**self.previous, **self.ids})
            manifest.record(self.run_dir, self.run_dir / TRACKERS_FILE)

    def _unreachable(self, name: str, why: str) -> None:
        message = f"output.report_to: {name} cannot be used — {why}"
        if self.output.tracker_required:
            self.finish("FAILED")
            raise SftError(message + " (output.tracker_required: true)")
        log.warning("%s; training goes on without it", message)

    def _start(self, name: str) -> Any:
        """Build and start one of Accelerate's trackers with this recipe's options."""
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        options = dict(self.output.tracker.get(name) or {})
        try:
            __import__(name)  # each tracker's package has the tracker's name
        except ImportError:
            raise SftError(f"the {name} package is not installed (pip install 'sft[trackers]')") from None
        builder = getattr(self, f"_{name}", None)
        tracker = builder(options) if builder else LOGGER_TYPE_TO_CLASS[name](self.run_name, **options)
        tracker.start()
        self._started(name, tracker)
        return tracker

    def _tensorboard(self, options: dict[str, Any]) -> Any:
        from accelerate.tracking import TensorBoardTracker

        directory = Path(options.pop("logging_dir", self.run_dir))
        if directory == self.run_dir:
            manifest.record(self.run_dir, directory / "tensorboard")
        return TensorBoardTracker("tensorboard", directory, **options)

    def _mlflow(self, options: dict[str, Any]) -> Any:
        import mlflow
        from accelerate.tracking import MLflowTracker

        # a server that stops answering mid-run must not stall each step for minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        uri = options.pop("tracking_uri", None)
        if uri:
            mlflow.set_tracking_uri(uri)
        _check_reachable(mlflow.get_tracking_uri())
        options.setdefault("experiment_name", self.run_name)
        options.setdefault("run_name", self.run_name)
        if "mlflow" in self.previous:
            options.setdefault("run_id", self.previous["mlflow"].get("run_id"))
        return MLflowTracker(**options)

    def _wandb(self, options: dict[str, Any]) -> Any:
        from accelerate.tracking import WandBTracker

        project = options.pop("project", self.run_name)
        options.setdefault("dir", str(self.run_dir))
        options.setdefault("name", self.run_name)
        if "wandb" in self.previous:
            options.setdefault("id", self.previous["wandb"].get("run_id"))
            options.setdefault("resume", "allow")
        mode = options.get("mode") or os.environ.get("WANDB_MODE", "online")
        if mode not in ("offline", "disabled", "dryrun") and not _wandb_key():
            raise SftError(
                "no W&B API key — run `wandb login`, set WANDB_API_KEY, or set output.tracker.wandb.mode: offline"
            )
        if Path(options["dir"]).resolve() == self.run_dir.resolve():
            manifest.record(self.run_dir, self.run_dir / "wandb")
        return WandBTracker(project, **options)

    def _started(self, name: str, tracker: Any) -> None:
        """After start: W&B plots against sft's step (its own _step only grows, so re-logged steps would drop)."""
        if name == "wandb":
            tracker.run.define_metric("step")
            tracker.run.define_metric("*", step_metric="step")

    def _identity(self, name: str, tracker: Any) -> dict[str, Any]:
        """What summary.json records about a started tracker: its run id and where the run lives."""
        if name == "mlflow":
            import mlflow

            info = tracker.active_run.info
            return {
                "run_id": info.run_id,
                "experiment_id": info.experiment_id,
                "tracking_uri": mlflow.get_tracking_uri(),
            }
        if name == "wandb":
            run = tracker.run
            return {"run_id": run.id, "project": run.project, "dir": str(Path(run.dir).parent), "url": run.url}
        if name == "tensorboard":
            return {"logdir": str(tracker.logging_dir)}
        run_id = getattr(getattr(tracker, "tracker", None), "id", None)
        return {"run_id": str(run_id)} if run_id is not None else {}

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl row to every tracker, at its step (numbers only)."""
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if values:
            step = int(record.get("step", 0))
            self._each("log", lambda tracker: _log(tracker, values, step))

    def log_artifacts(self) -> None:
        """The run's pictures and JSON reports: MLflow artifacts, W&B files / images, TensorBoard images."""
        paths = [self.run_dir / name for name in ARTIFACTS if (self.run_dir / name).exists()]
        if paths:
            self._each("upload artifacts", lambda tracker: _upload(tracker, paths))

    def finish(self, status: str = "FINISHED") -> None:
        """End every tracker run (flushes W&B, closes TensorBoard's writer, ends the MLflow run with `status`:
        FINISHED, FAILED or KILLED)."""
        self._each("finish", lambda tracker: _close(tracker, status))
        self.active.clear()

    def _each(self, what: str, action: Any) -> None:
        for name, tracker in list(self.active.items()):
            try:
                action(tracker)
            except Exception as err:  # never a crash mid-run: drop the tracker, keep training
                log.warning(
                    "output.report_to: %s failed to %s (%s) — no more logging to it in this run",
                    name,
                    what,
                    _short(err),
                )
                self.active.pop(name, None)


def _short(err: BaseException) -> str:
    """An exception's message on one line, cut to 300 characters."""
    return " ".join(str(err).split())[:300]


def _log(tracker: Any, values: dict[str, Any], step: int) -> None:
    """W&B gets the step as a value (its x-axis, see `_started`); the others as the step."""
    if tracker.name == "wandb":
        tracker.log({**values, "step": step})
    else:
        tracker.log(values, step=step)


def _close(tracker: Any, status: str = "FINISHED") -> None:
    """End a tracker run, best effort (an MLflow run with its status)."""
    if tracker is None:
        return
    if tracker.name == "mlflow":
        import mlflow

        mlflow.end_run(status=status)
    elif tracker.name == "wandb":
        tracker.run.finish(exit_code=0 if status == "FINISHED" else 1)
    else:
        tracker.finish()


def _upload(tracker: Any, paths: list[Path]) -> None:
    """Send files the way each tracker keeps them (a folder's pictures under its name)."""
    if tracker.name == "mlflow":
        for path in paths:
            if path.is_dir():
                tracker.log_artifacts(str(path), path.name)
            else:
                tracker.log_artifact(str(path), None)
        return
    paths = [f for p in paths for f in (sorted(p.rglob("*.png")) if p.is_dir() else [p])]
    images = [p for p in paths if p.suffix == ".png"]
    if tracker.name == "wandb":
        import wandb

        for path in paths:
            if path.is_file():
                wandb.save(str(path), base_path=str(path.parent), policy="now")
        if images:
            tracker.log(
                {p.stem if p.parent.name != "samples" else f"samples/{p.stem}": wandb.Image(str(p)) for p in images}
            )
        return
    if tracker.name == "tensorboard" and images:
        import numpy as np
        from PIL import Image

        for path in images:
            pixels = np.asarray(Image.open(path).convert("RGB"))
            tag = path.stem if path.parent.name != "samples" else f"samples/{path.stem}"
            tracker.writer.add_image(tag, pixels, dataformats="HWC")
        tracker.writer.flush()


def _check_reachable(uri: str) -> None:
    """An HTTP tracking server must accept a connection within a few seconds (MLflow would retry for minutes)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=5).close()
    except OSError as err:
        raise SftError(f"no tracking server answers at {uri} ({err.strerror or err})") from None


def _wandb_key() -> Optional[str]:
    """A W&B API key from the environment or `wandb login`'s netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        entry = netrc.netrc().authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None
