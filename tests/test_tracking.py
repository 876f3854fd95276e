"""Experiment tracking: what TensorBoard, MLflow and W&B receive equals what metrics.jsonl holds."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest

from fedtune import config as cfg
from fedtune import tracking
from fedtune.report import read_metrics

def _replay(run: Path, out: Path, backend: str, **extra) -> Path:
    """Feed a finished run's records to a fresh tracker, as the run fed them while it ran (the live path is
    tested with TensorBoard on the shared comparison), and finish it with the run's summary."""
    if importlib.util.find_spec(tracking.PACKAGES[backend]) is None:
        pytest.skip(f"{backend} is not installed (pip install 'fedtune[tracking]')")
    out.mkdir(parents=True)
    for name in ("metrics.jsonl", "summary.json", "config.resolved.yaml"):
        shutil.copy(run / name, out / name)
    c = cfg.load(out / "config.resolved.yaml", [f"tracking.backend={backend}",
                                                *(f"tracking.{k}={v}" for k, v in extra.items())])
    tracker = tracking.start(c, out)
    for record in read_metrics(out):
        tracker.log(record)
    tracker.finish(json.loads((out / "summary.json").read_text()))
    return out


def expected(records: list[dict]) -> dict[str, dict[int, float]]:
    """Per-round figures computed by hand from metrics.jsonl: the reference every backend is held to."""
    out: dict[str, dict[int, float]] = {"accuracy": {}, "bytes_up": {}, "bytes_down": {}, "client_flops": {},
                                        "client_peak_memory_bytes": {}, "train_loss": {}, "cumulative_bytes": {}}
    total = 0
    for r in records:
        if r["type"] == "eval":
            out["accuracy"][r["round"]] = r["accuracy"]
    for rnd in sorted({r["round"] for r in records if r["type"] == "client"}):
        cs = [r for r in records if r["type"] == "client" and r["round"] == rnd]
        out["bytes_up"][rnd] = sum(r["bytes_up"] for r in cs)
        out["bytes_down"][rnd] = sum(r["bytes_down"] for r in cs)
        total += out["bytes_up"][rnd] + out["bytes_down"][rnd]
        out["cumulative_bytes"][rnd] = total
        out["client_flops"][rnd] = sum(r["flops"] for r in cs)
        out["client_peak_memory_bytes"][rnd] = max(r["peak_memory_bytes"] for r in cs)
        out["train_loss"][rnd] = sum(r["train_loss"] for r in cs) / len(cs)
    return out


def norms(records: list[dict], rnd: int) -> list[float]:
    return sorted(r["update_norm"] for r in records if r["type"] == "client" and r["round"] == rnd)


def test_round_metrics_by_hand():
    clients = [
        {"status": "ok", "bytes_up": 10, "bytes_down": 20, "flops": 100, "peak_memory_bytes": 5, "seconds": 1.5,
         "train_loss": 2.0, "update_norm": 0.5},
        {"status": "ok", "bytes_up": 30, "bytes_down": 20, "flops": 300, "peak_memory_bytes": 9, "seconds": 0.5,
         "train_loss": 4.0, "update_norm": 1.5},
        {"status": "failed", "bytes_up": 0, "bytes_down": 20},
    ]
    scalars, got = tracking.round_metrics(clients, total_bytes=1000)
    assert scalars == {"bytes_up": 40.0, "bytes_down": 60.0, "cumulative_bytes": 1000.0, "client_seconds": 2.0,
                       "clients_ok": 2.0, "clients_failed": 1.0, "client_flops": 400.0,
                       "client_peak_memory_bytes": 9.0, "train_loss": 3.0}
    assert got == [0.5, 1.5]
    clients[1]["flops"] = None  # not counted: no FLOP figure rather than a wrong one
    assert "client_flops" not in tracking.round_metrics(clients, 0)[0]


class Recorder(tracking.Backend):
    def __init__(self):
        self.calls = []

    def scalars(self, step, values):
        self.calls.append(("scalars", step, dict(values)))

    def histogram(self, step, name, values):
        self.calls.append(("histogram", step, name, list(values)))

    def summary(self, values):
        self.calls.append(("summary", dict(values)))

    def close(self, failed):
        self.calls.append(("close", failed))


def test_tracker_steps_are_rounds_and_epsilon_is_logged():
    rec = Recorder()
    t = tracking.Tracker(rec)
    seen = []
    log = t.wrap(seen.append)
    log({"type": "eval", "round": 0, "accuracy": 0.25, "model": "base"})
    log({"type": "client", "round": 1, "client": 0, "status": "ok", "bytes_up": 3, "bytes_down": 4, "update_norm": 2.0})
    log({"type": "round", "round": 1, "replies": 1, "epsilon": 1.25})
    log({"type": "eval", "round": 1, "accuracy": 0.5})
    t.finish({"accuracy": 0.5, "bytes_up": 3})
    assert len(seen) == 4  # the run folder still gets every record
    assert rec.calls[0] == ("scalars", 0, {"base_accuracy": 0.25, "accuracy": 0.25})
    assert rec.calls[1][:2] == ("scalars", 1) and rec.calls[1][2]["cumulative_bytes"] == 7.0
    assert rec.calls[2] == ("histogram", 1, "update_norm", [2.0])
    assert ("scalars", 1, {"epsilon": 1.25}) in rec.calls
    assert ("scalars", 1, {"accuracy": 0.5}) in rec.calls
    assert rec.calls[-2] == ("summary", {"final/accuracy": 0.5, "final/bytes_up": 3.0})
    assert rec.calls[-1] == ("close", False)


def test_bad_tracking_settings_are_refused():
    with pytest.raises(cfg.ConfigError, match="tracking.backend"):
        cfg.from_dict({"tracking": {"backend": "neptune"}})
    with pytest.raises(ValueError, match="tracking.uri .* mlflow"):
        cfg.from_dict({"tracking": {"backend": "tensorboard", "uri": "sqlite:///x.db"}})


@pytest.mark.parametrize("run", ["fedpeft", "split"])
def test_tensorboard_holds_the_metrics(tiny_comparison, run):
    """The shared comparison ran with tracking.backend=tensorboard: what each run logged live."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tiny_comparison / run
    records = read_metrics(out)
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    for name, by_round in expected(records).items():
        got = {e.step: e.value for e in ea.Scalars(name)}
        assert got.keys() == by_round.keys(), name
        for rnd, v in by_round.items():
            assert math.isclose(got[rnd], v, rel_tol=1e-6), (name, rnd, got[rnd], v)  # float32 in the event file
    for rnd in (1, 2):
        h = next(e for e in ea.Histograms("update_norm") if e.step == rnd).histogram_value
        want = norms(records, rnd)
        assert h.num == len(want) and math.isclose(h.sum, sum(want), rel_tol=1e-9)
        assert math.isclose(h.min, want[0], rel_tol=1e-9) and math.isclose(h.max, want[-1], rel_tol=1e-9)
    hparams = ea.PluginTagToContent("hparams")
    assert hparams and any(b"federation.rounds" in v for v in hparams.values())


def test_mlflow_holds_the_metrics(tiny_comparison, tmp_path):
    out = _replay(tiny_comparison / "fedpeft", tmp_path / "run", "mlflow", project="fedtune-test")
    from mlflow.tracking import MlflowClient

    records = read_metrics(out)
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("fedtune-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["federation.rounds"] == "2" and run.data.params["peft.r"] == "4"
    for name, by_round in expected(records).items():
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert got == pytest.approx(by_round, rel=1e-12), name
    for rnd in (1, 2):
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "update_norm_max")}
        assert got[rnd] == pytest.approx(norms(records, rnd)[-1], rel=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert run.data.metrics["final.accuracy"] == pytest.approx(summary["accuracy"])


def test_wandb_writes_an_offline_run(tiny_comparison, tmp_path):
    """W&B 0.31 has no reader for offline runs, so the run's record file is read as bytes: each accuracy and the
    update-norm histogram are in it, as W&B's JSON values, and nothing went over a network (mode offline)."""
    out = _replay(tiny_comparison / "fedpeft", tmp_path / "run", "wandb")
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (data,) = run_dir.glob("*.wandb")
    raw = data.read_bytes()
    assert len(raw) > 1000, f"{data} holds {len(raw)} bytes: the run's records were not written"
    for r in read_metrics(out):
        if r["type"] == "eval":
            assert json.dumps(r["accuracy"]).encode() in raw
    assert b"update_norm" in raw and b"cumulative_bytes" in raw and b"final/accuracy" in raw
