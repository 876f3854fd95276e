"""Experiment tracking: a run's numbers, as it goes, in TensorBoard, MLflow or Weights & Biases.

``tracking.backend`` picks one. The tracker sees every record the run appends to ``metrics.jsonl`` (it wraps
the run folder's ``log``) and turns each round into one step of scalars: accuracy, train losses, bytes up and
down (and their running total), client FLOPs, client peak memory, client seconds, epsilon when a record carries
one; a histogram of the clients' update norms; the resolved config as hyper-parameters; the summary at the end.
metrics.jsonl stays the record of truth: what a backend shows is computed from it by `round_metrics`.

Where it writes, by default inside the run folder: ``tensorboard/`` (open with ``tensorboard --logdir``),
``mlruns/`` (an MLflow file store: ``mlflow ui --backend-store-uri <run>/mlruns``), ``wandb/`` (an offline
W&B run: ``wandb sync <run>/wandb/offline-run-*`` uploads it later). Nothing needs a network.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import registry

BACKENDS = ("none", "tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
"""The package each backend imports (``pip install 'fedtune[tracking]'`` installs them all)."""


@dataclass
class TrackingConfig:
    backend: Literal["none", "tensorboard", "mlflow", "wandb"] = "none"
    """Where the run's per-round numbers also go: `none`, `tensorboard` (event files in <run>/tensorboard), `mlflow` (a file store in <run>/mlruns) or `wandb` (an offline run in <run>/wandb); pip install 'fedtune[tracking]'."""
    dir: str | None = None
    """The backend's folder instead of its default inside the run folder (relative paths are relative to the run folder)."""
    uri: str | None = None
    """mlflow only: a tracking URI instead of the file store in the run folder, e.g. sqlite:///mlflow.db or http://host:5000."""
    project: str = "fedtune"
    """The MLflow experiment or W&B project the run is filed under."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """wandb only: `offline` writes the run to disk with no network (wandb sync uploads it later); `online` streams it to the W&B server."""


def _validate(config) -> None:
    t = config.tracking
    package = PACKAGES.get(t.backend)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(f"tracking.backend = {t.backend!r} needs the {package!r} package, which is not installed: "
                         "pip install 'fedtune[tracking]' (or set tracking.backend: none).")
    if t.uri is not None and t.backend != "mlflow":
        raise ValueError(f"tracking.uri = {t.uri!r} is for tracking.backend: mlflow (the backend is {t.backend!r}); "
                         "drop it or set the backend to mlflow.")
    if not t.project.strip():
        raise ValueError("tracking.project = '' is not allowed: give the MLflow experiment / W&B project a name.")


registry.register_option(registry.Option("tracking", TrackingConfig, _validate))


# --------------------------------------------------------------------------- what is logged


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if _number(v) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def round_metrics(clients: list[dict[str, Any]], total_bytes: float) -> tuple[dict[str, float], list[float]]:
    """One round's scalars from its client records, and the clients' update norms (for the histogram).

    Sums over the round's clients: ``bytes_up``, ``bytes_down``, ``client_flops`` (absent when FLOPs were not
    counted), ``client_seconds``; ``cumulative_bytes`` is `total_bytes` (up + down of all rounds so far, this one
    included); the largest ``client_peak_memory_bytes``; means over the clients that trained: ``train_loss``,
    ``distill_loss``; ``clients_ok`` and ``clients_failed``.
    """
    ok = [r for r in clients if r.get("status") == "ok"]
    out: dict[str, float] = {
        "bytes_up": float(sum(r.get("bytes_up", 0) for r in clients)),
        "bytes_down": float(sum(r.get("bytes_down", 0) for r in clients)),
        "cumulative_bytes": float(total_bytes),
        "client_seconds": float(sum(r.get("seconds", 0.0) for r in ok)),
        "clients_ok": float(len(ok)),
        "clients_failed": float(len(clients) - len(ok)),
    }
    flops = [r.get("flops") for r in ok]
    if flops and all(_number(f) for f in flops):
        out["client_flops"] = float(sum(flops))
    peaks = [r["peak_memory_bytes"] for r in ok if _number(r.get("peak_memory_bytes"))]
    if peaks:
        out["client_peak_memory_bytes"] = float(max(peaks))
    for key in ("train_loss", "distill_loss"):
        m = _mean([r.get(key) for r in ok])
        if m is not None:
            out[key] = m
    norms = [float(r["update_norm"]) for r in ok if _number(r.get("update_norm"))]
    return out, norms


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The resolved config as ``{"section.key": value}`` hyper-parameters (lists and mappings as text)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and prefix == "":
            out.update(flatten(v, f"{k}."))
        elif v is None or isinstance(v, (list, tuple, dict)):
            out[prefix + k] = "null" if v is None else str(v)
        else:
            out[prefix + k] = v
    return out


SUMMARY_KEYS = ("accuracy", "base_accuracy", "bytes_up", "bytes_down", "client_flops", "server_flops",
                "client_peak_memory_bytes", "client_seconds", "wall_time_s", "failed_client_rounds")
"""The summary.json numbers a tracker logs at the end, as ``final/<key>``."""


class Tracker:
    """Turns the run's records into per-round steps for one backend (`Backend`); `NullTracker` logs nothing."""

    def __init__(self, backend: "Backend") -> None:
        self.backend = backend
        self.pending: dict[int, list[dict[str, Any]]] = {}
        self.total_bytes = 0.0
        self.closed = False

    def wrap(self, log: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        """`log` (the run folder's) followed by this tracker's."""
        def both(record: dict[str, Any]) -> None:
            log(record)
            self.log(record)
        return both

    def log(self, record: dict[str, Any]) -> None:
        kind, rnd = record.get("type"), record.get("round", 0)
        if kind == "client":
            self.pending.setdefault(rnd, []).append(record)
        elif kind == "round":
            self._flush(rnd)
        elif kind == "eval" and _number(record.get("accuracy")):
            self._flush(rnd)
            name = "base_accuracy" if record.get("model") == "base" else "accuracy"
            self.backend.scalars(rnd, {name: record["accuracy"], **({"accuracy": record["accuracy"]}
                                                                    if name == "base_accuracy" else {})})
        elif kind == "server":
            flops = {"server_flops": float(record["flops"])} if _number(record.get("flops")) else {}
            self.backend.scalars(rnd, {**flops, "server_seconds": float(record.get("seconds") or 0.0)})
        elif kind == "paradigm":
            self.backend.scalars(rnd, {f"paradigm/{k}": float(v) for k, v in record.items()
                                       if k not in ("type", "round") and _number(v) and math.isfinite(v)})
        if kind not in ("paradigm", "client") and _number(record.get("epsilon")):
            self.backend.scalars(rnd, {"epsilon": float(record["epsilon"])})

    def _flush(self, rnd: int) -> None:
        clients = self.pending.pop(rnd, None)
        if not clients:
            return
        self.total_bytes += sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in clients)
        scalars, norms = round_metrics(clients, self.total_bytes)
        self.backend.scalars(rnd, scalars)
        if norms:
            self.backend.histogram(rnd, "update_norm", norms)

    def finish(self, summary: dict[str, Any]) -> None:
        """Log what is still pending and the run's summary, then close the backend."""
        for rnd in sorted(self.pending):
            self._flush(rnd)
        final = {f"final/{k}": float(summary[k]) for k in SUMMARY_KEYS if _number(summary.get(k))}
        self.backend.summary(final)
        self.close()

    def close(self, failed: bool = False) -> None:
        if not self.closed:
            self.closed = True
            self.backend.close(failed)


class NullTracker(Tracker):
    """``tracking.backend: none``."""

    def __init__(self) -> None:
        super().__init__(None)  # type: ignore[arg-type]

    def wrap(self, log):
        return log

    def log(self, record) -> None:
        pass

    def finish(self, summary) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


# --------------------------------------------------------------------------- backends


class Backend:
    """What a tracking library is asked to do."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def histogram(self, step: int, name: str, values: list[float]) -> None: ...

    def summary(self, values: dict[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


class TensorBoard(Backend):
    def __init__(self, folder: Path, hparams: dict[str, Any], config_yaml: str) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        self.writer = SummaryWriter(log_dir=str(folder))
        self.hparams = hparams
        self.hparams_summary = hparams_summary
        self.writer.add_text("config", "```yaml\n" + config_yaml + "\n```", 0)

    def scalars(self, step, values):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def histogram(self, step, name, values):
        import numpy as np

        self.writer.add_histogram(name, np.asarray(values, dtype=np.float64), step)

    def summary(self, values):
        # The hparams plugin's table: each hyper-parameter with the run's final numbers, in this run's own folder.
        experiment, session_start, session_end = self.hparams_summary(self.hparams, values)
        w = self.writer._get_file_writer()
        for s in (experiment, session_start, session_end):
            w.add_summary(s)
        for k, v in values.items():
            self.writer.add_scalar(k, v, 0)

    def close(self, failed):
        self.writer.close()


class MLflow(Backend):
    def __init__(self, uri: str, project: str, run_name: str, hparams: dict[str, Any], config_yaml: str) -> None:
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store "in maintenance mode" behind this switch; it needs no server or database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in hparams.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, config_yaml, "config.resolved.yaml")

    def scalars(self, step, values):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k.replace("/", "."), float(v), now, step) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def histogram(self, step, name, values):
        # MLflow has no histogram: the spread as three scalars, and the values themselves as a JSON artifact.
        import json

        self.scalars(step, {f"{name}_min": min(values), f"{name}_mean": sum(values) / len(values),
                            f"{name}_max": max(values)})
        self.client.log_text(self.run_id, json.dumps(values), f"{name}/round_{step}.json")

    def summary(self, values):
        self.scalars(0, values)

    def close(self, failed):
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandB(Backend):
    def __init__(self, folder: Path, project: str, run_name: str, config: dict[str, Any], mode: str) -> None:
        import wandb

        self.wandb = wandb
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=run_name, dir=str(folder), mode=mode, config=config,
                              reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def scalars(self, step, values):
        if values:
            self.run.log({**values, "round": step}, step=step)

    def histogram(self, step, name, values):
        self.run.log({name: self.wandb.Histogram(values), "round": step}, step=step)

    def summary(self, values):
        for k, v in values.items():
            self.run.summary[k] = v

    def close(self, failed):
        self.run.finish(exit_code=1 if failed else 0)
        # Wait for W&B's service process to write everything: on a busy machine the offline run's file was
        # seen holding only its header right after finish().
        self.wandb.teardown()


def start(config, path: Path) -> Tracker:
    """The tracker of a run (a `NullTracker` for ``tracking.backend: none``), its backend opened."""
    t = config.tracking
    if t.backend == "none":
        return NullTracker()
    import yaml

    resolved = config.to_dict()
    hparams = flatten(resolved)
    config_yaml = yaml.safe_dump(resolved, sort_keys=False)
    run_name = path.name
    folder = Path(t.dir) if t.dir else None
    if folder is not None and not folder.is_absolute():
        folder = path / folder
    if t.backend == "tensorboard":
        return Tracker(TensorBoard(folder or path / "tensorboard", hparams, config_yaml))
    if t.backend == "mlflow":
        uri = t.uri or (folder or path / "mlruns").resolve().as_uri()
        return Tracker(MLflow(uri, t.project, run_name, hparams, config_yaml))
    return Tracker(WandB(folder or path, t.project, run_name, resolved, t.wandb_mode))
