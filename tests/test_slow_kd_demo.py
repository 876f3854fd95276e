"""Opt-in (pytest -m slow, or make test-slow): KD on the demo task with the real default model (issue 16)."""

from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES

pytestmark = pytest.mark.slow


def test_kd_on_the_demo_task_ends_20_points_above_the_base_model(tmp_path):
    import fedtune
    from fedtune import config as cfg

    # examples/demo.yaml as `make demo` runs it, KD part (see docs/kd-findings.md for the settings and timings).
    c = cfg.load(EXAMPLES / "demo.yaml", ["federation.paradigm=kd"])
    summary = fedtune.run(c, out=tmp_path / "run", quiet=True)
    print(json.dumps(summary, indent=2))
    assert summary["accuracy"] >= summary["base_accuracy"] + 0.2
    # Keep-best: the server's distillation never ended a round below the average it started from.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    servers = [r for r in records if r["type"] == "server" and "val_best" in r]
    assert all(r["val_best"] >= r["val_start"] for r in servers)
