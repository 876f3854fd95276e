"""report.html and comparison.html, opened in headless Chromium: no console errors, the tables hold the runs'
numbers (computed here from metrics.jsonl), every plot is drawn with the runs' data; a screenshot is left in
test-artefacts/."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedtune.html_report import curves, read_partition
from fedtune.report import read_metrics

ROWS_JS = "return [...document.querySelectorAll(arguments[0] + ' tr')].map(tr => [...tr.cells].map(c => c.textContent))"
PLOTS_JS = """return [...document.querySelectorAll('.js-plotly-plot')].map(p => ({
  id: p.id, svg: p.querySelectorAll('.main-svg').length, traces: p.querySelectorAll('g.trace').length,
  data: p.data.map(t => ({name: t.name || null, x: Array.from(t.x || []), y: Array.from(t.y || [])}))}))"""


def by_hand(run: Path) -> dict:
    """A run's figures computed from metrics.jsonl alone."""
    records = read_metrics(run)
    evals = [r for r in records if r["type"] == "eval"]
    clients = [r for r in records if r["type"] == "client"]
    return {"accuracy": evals[-1]["accuracy"], "evals": [(r["round"], r["accuracy"]) for r in evals],
            "up": sum(r["bytes_up"] for r in clients), "down": sum(r["bytes_down"] for r in clients)}


def _console_errors(browser) -> list:
    return [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]


def test_pages_are_self_contained(tiny_comparison):
    for page in [tiny_comparison / "comparison.html", tiny_comparison / "fedpeft" / "report.html"]:
        text = page.read_text()
        assert "Plotly.newPlot" in text and "plotly.js" in text[:20000].lower()  # plotly.js is inlined
        assert not re.search(r"<script[^>]*\bsrc=", text), f"{page} loads a script from elsewhere"
        assert not re.search(r"<link[^>]*\bhref=[\"']?(https?:)?//", text), f"{page} loads a stylesheet from elsewhere"


def test_partition_json_is_the_run_split(tiny_comparison):
    p = read_partition(tiny_comparison / "fedpeft")
    assert set(p["clients"]) == {"0", "1"}
    assert sum(sum(c.values()) for c in p["clients"].values()) == 80  # demo_train_size, all in the partition
    assert read_partition(tiny_comparison / "split") == p  # the same split for every framework


def test_comparison_and_run_pages_in_chromium(tiny_comparison, browser, artefacts):
    rows = json.loads((tiny_comparison / "comparison.json").read_text())

    browser.get((tiny_comparison / "comparison.html").as_uri())
    browser.save_screenshot(str(artefacts / "comparison.png"))
    assert _console_errors(browser) == []
    table = browser.execute_script(ROWS_JS, "#comparison")
    header, cells = table[0], table[1:]
    col = {name: i for i, name in enumerate(header)}
    assert [c[0] for c in cells] == [r["run"] for r in rows] == ["fedpeft", "split"]
    for r, c in zip(rows, cells):
        want = by_hand(tiny_comparison / r["run"])
        assert c[col["accuracy"]] == f"{want['accuracy']:.3f}"
        assert c[col["MB up"]] == f"{want['up'] / 1e6:.2f}" and c[col["MB down"]] == f"{want['down'] / 1e6:.2f}"
        assert c[col["access"]] == "white"
    cards = browser.execute_script("return [...document.querySelectorAll('.card')].map(c => c.textContent)")
    assert len(cards) == 2 and all("white-box" in t for t in cards)
    plots = {p["id"]: p for p in browser.execute_script(PLOTS_JS)}
    assert set(plots) == {"plot-accuracy", "plot-communication", "plot-compute", "plot-labels"}
    assert all(p["svg"] > 0 and p["traces"] > 0 for p in plots.values()), plots
    for trace, r in zip(plots["plot-accuracy"]["data"], rows):
        want = by_hand(tiny_comparison / r["run"])["evals"]
        assert trace["x"] == [rnd for rnd, _ in want]
        assert trace["y"] == pytest.approx([a for _, a in want], abs=1e-12)
    partition = read_partition(tiny_comparison / "fedpeft")
    bars = plots["plot-labels"]["data"]
    assert sum(sum(t["y"]) for t in bars) == sum(sum(c.values()) for c in partition["clients"].values())

    run = tiny_comparison / "fedpeft"
    browser.get((run / "report.html").as_uri())
    browser.save_screenshot(str(artefacts / "report.png"))
    assert _console_errors(browser) == []
    summary = dict(browser.execute_script(ROWS_JS, "#summary")[1:])
    want = by_hand(run)
    assert summary["final accuracy"] == f"{want['accuracy']:.3f}"
    assert summary["MB up / down"] == f"{want['up'] / 1e6:.2f} / {want['down'] / 1e6:.2f}"
    plots = {p["id"]: p for p in browser.execute_script(PLOTS_JS)}
    assert all(p["svg"] > 0 and p["traces"] > 0 for p in plots.values()) and len(plots) == 4
    c = curves(read_metrics(run))
    assert plots["plot-communication"]["data"][0]["x"] == pytest.approx(c["mb"])
    clients = browser.execute_script(ROWS_JS, "#clients")[1:]
    assert len(clients) == sum(1 for r in read_metrics(run) if r["type"] == "client")


def test_curves_by_hand():
    records = [
        {"type": "eval", "round": 0, "accuracy": 0.2, "model": "base"},
        {"type": "client", "round": 1, "status": "ok", "bytes_up": 1_000_000, "bytes_down": 500_000, "flops": 2e9},
        {"type": "client", "round": 1, "status": "ok", "bytes_up": 1_000_000, "bytes_down": 500_000, "flops": 1e9},
        {"type": "client", "round": 2, "status": "ok", "bytes_up": 1_000_000, "bytes_down": 0, "flops": 1e9},
        {"type": "eval", "round": 2, "accuracy": 0.5},
    ]
    assert curves(records) == {"round": [0, 2], "accuracy": [0.2, 0.5], "mb": [0.0, 4.0], "gflops": [0.0, 4.0]}
    records[1]["flops"] = None  # not counted: no compute axis rather than a wrong one
    assert curves(records)["gflops"] == [None, None]
