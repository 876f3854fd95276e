"""`fedtune compare` end to end on tiny-llama."""

from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES
from fedtune import config as cfg
from fedtune.cli import main
from fedtune.compare import parse_sweep, plan

ROW_KEYS = {"paradigm", "base_accuracy", "accuracy", "bytes_up", "bytes_down", "client_flops",
            "client_peak_memory_bytes", "wall_time_s"}


def test_compare_writes_one_row_per_framework_and_plots(tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", str(EXAMPLES / "quickstart-tiny.yaml"), "--paradigms", "fedpeft,kd,split",
                 "--set", "federation.rounds=1", "--set", "kd.public_size=8", "--set", "kd.server_steps=1",
                 "--set", "kd.distill_steps=1", "--out", str(out), "--quiet"])
    assert code == 0
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["paradigm"] for r in rows] == ["fedpeft", "kd", "split"]
    for r in rows:
        assert ROW_KEYS <= set(r)
        summary = json.loads((out / r["run"] / "summary.json").read_text())
        assert r["bytes_up"] == summary["bytes_up"] > 0 and r["accuracy"] == summary["accuracy"]
    # the base model is scored once and shared: same model, same data
    assert len({r["base_accuracy"] for r in rows}) == 1
    md = (out / "comparison.md").read_text()
    assert all(f"| {r['run']} |" in md for r in rows)
    for name in ("accuracy_vs_round.png", "accuracy_vs_communication.png", "compute_vs_accuracy.png"):
        assert (out / "plots" / name).stat().st_size > 1000


def test_sweep_plans_every_point_and_validates_before_running():
    runs = plan(str(EXAMPLES / "quickstart-tiny.yaml"), [], ["fedpeft", "centralized"],
                parse_sweep(["peft.r=4,8", "data.alpha=0.1,10"]))
    assert len(runs) == 2 * 2 * 2
    assert {(r.config.peft.r, r.config.data.alpha, r.config.federation.paradigm) for r in runs} == {
        (r, a, p) for r in (4, 8) for a in (0.1, 10.0) for p in ("fedpeft", "centralized")}
    with pytest.raises(cfg.ConfigError, match="peft.r"):
        plan(None, [], ["fedpeft"], parse_sweep(["peft.r=4,0"]))
    with pytest.raises(cfg.ConfigError, match="not one of"):
        plan(None, [], ["fedsgd"], [])
    with pytest.raises(cfg.ConfigError, match="section.key=v1,v2"):
        parse_sweep(["peft.r"])
