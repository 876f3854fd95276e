"""`fedtune report`: run and comparison folders rebuilt from metrics.jsonl alone, and runs made separately
compared."""

from __future__ import annotations

import json
import shutil

import pytest

from fedtune.cli import main


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_run_folder_is_rebuilt_from_its_metrics(tiny_comparison, tmp_path):
    run = _copy(tiny_comparison / "fedpeft", tmp_path / "fedpeft")
    before = {name: (run / name).read_text() for name in ("summary.json", "report.md")}
    for name in ("report.md", "report.html"):
        (run / name).unlink()
    shutil.rmtree(run / "plots")
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == before["report.md"]
    assert json.loads((run / "summary.json").read_text()) == json.loads(before["summary.json"])
    assert (run / "report.html").stat().st_size > 100_000
    assert {p.name for p in (run / "plots").iterdir()} == {"accuracy.png", "communication.png"}


def test_a_run_without_summary_gets_its_numbers_from_metrics(tiny_comparison, tmp_path):
    """An interrupted run (no summary.json): every figure from metrics.jsonl, the wall time a lower bound."""
    run = _copy(tiny_comparison / "fedpeft", tmp_path / "fedpeft")
    want = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    assert main(["report", str(run)]) == 0
    got = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in records if r["type"] == "client"]
    assert got["bytes_up"] == sum(r["bytes_up"] for r in clients) == want["bytes_up"]
    assert got["accuracy"] == [r for r in records if r["type"] == "eval"][-1]["accuracy"] == want["accuracy"]
    assert got["wall_time_s"] == pytest.approx(sum(r.get("seconds", 0) for r in records
                                                   if r["type"] in ("client", "server")))


def test_a_comparison_folder_is_rebuilt_in_place(tiny_comparison, tmp_path):
    cmp = _copy(tiny_comparison, tmp_path / "cmp")
    rows = json.loads((cmp / "comparison.json").read_text())
    md = (cmp / "comparison.md").read_text()
    (cmp / "comparison.html").unlink()
    (cmp / "comparison.md").unlink()
    assert main(["report", str(cmp)]) == 0
    # comparison.md lost its title line with the file, so only the table and what follows are compared
    assert (cmp / "comparison.md").read_text().split("\n", 1)[1] == md.split("\n", 1)[1]
    assert json.loads((cmp / "comparison.json").read_text()) == rows
    assert (cmp / "comparison.html").is_file()


def test_runs_made_separately_are_compared(tiny_comparison, tmp_path, capsys):
    a = _copy(tiny_comparison / "fedpeft", tmp_path / "one" / "fedpeft")
    b = _copy(tiny_comparison / "split", tmp_path / "two" / "split")
    out = tmp_path / "both"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    assert f"{out}/comparison.html" in capsys.readouterr().out
    rows = json.loads((out / "comparison.json").read_text())
    want = json.loads((tiny_comparison / "comparison.json").read_text())
    assert rows == want  # the same rows `fedtune compare` wrote when it ran them together
    html = (out / "comparison.html").read_text()
    assert "../one/fedpeft/report.html" in html and "../two/split/report.html" in html


def test_clashing_names_get_their_parents():
    from pathlib import Path

    from fedtune.rebuild import _labels

    assert _labels([Path("a/b/run"), Path("a/c/run"), Path("a/b/other")]) == ["b/run", "c/run", "b/other"]
    assert _labels([Path("one/run"), Path("two/split")]) == ["run", "split"]


def test_not_a_run_folder_is_refused(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
