"""`fedtune report`: rebuild reports from run folders alone, and compare runs that were made separately.

A run folder (``metrics.jsonl`` and ``config.resolved.yaml``) gets its summary.json, report.md, report.html and
plots/ written again from those two files; a comparison folder (``comparison.json``) gets each of its runs
rebuilt and then comparison.md, comparison.html and plots/. Several folders give one comparison of all their
runs in ``--out``. Nothing is trained or evaluated: every number comes from metrics.jsonl.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from . import config as _config  # noqa: F401  (registers the paradigms summarize looks up)
from .compare import row, write_comparison
from .html_report import run_page
from .report import plot, read_metrics, summarize, write_summary


def is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() and (path / "config.resolved.yaml").is_file()


def is_comparison(path: Path) -> bool:
    return (path / "comparison.json").is_file()


def rebuild_run(path: Path) -> dict[str, Any]:
    """Write summary.json, report.md, report.html and plots/ of run folder `path` again; return the summary.

    The base accuracy is the run's own round-0 evaluation, or (a comparison's run that did not score the base)
    the one summary.json already holds. The wall time is summary.json's; a run that stopped before writing one
    gets the sum of its clients' and servers' seconds, a lower bound.
    """
    records = read_metrics(path)
    config = yaml.safe_load((path / "config.resolved.yaml").read_text())
    old = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
    base = next((r["accuracy"] for r in records if r.get("type") == "eval" and r.get("model") == "base"),
                old.get("base_accuracy"))
    wall = old.get("wall_time_s")
    if wall is None:
        wall = sum(r.get("seconds", 0.0) or 0.0 for r in records if r.get("type") in ("client", "server"))
    s = {**old, **summarize(records, config, base, wall)}  # keeps what others added (base_accuracy_from, ...)
    plot(records, path / "plots")
    write_summary(path, s)
    run_page(path)
    return s


def _title(folder: Path) -> str:
    """The comparison's title as comparison.md has it (the config it ran), or one naming the folder."""
    md = folder / "comparison.md"
    if md.is_file():
        first = md.read_text().splitlines()[:1]
        if first and first[0].startswith("# "):
            return first[0][2:]
    return f"fedtune report: {folder.name}"


def rebuild_comparison(folder: Path) -> list[dict[str, Any]]:
    """Rebuild every run of comparison folder `folder`, then its comparison files; return the rows."""
    old_rows = json.loads((folder / "comparison.json").read_text())
    rows, done = [], []
    for old in old_rows:
        run_dir = folder / old["run"]
        if not is_run(run_dir):
            raise ValueError(f"{folder}/comparison.json names run {old['run']!r}, but {run_dir} is not a run folder "
                             "(no metrics.jsonl and config.resolved.yaml).")
        s = rebuild_run(run_dir)
        rows.append({**old, **row(old["run"], {}, s)})  # swept keys, settings and tuning stay as they were
        done.append((old["run"], run_dir))
    swept = [k for k in old_rows[0] if "." in k] if old_rows else []
    tuned = next((next(iter(r["tuned"])) for r in rows if r.get("tuned")), None)
    write_comparison(folder, rows, done, swept, _title(folder), tuned)
    (folder / "comparison.json").write_text(json.dumps(rows, indent=2))
    return rows


def _labels(paths: list[Path]) -> list[str]:
    """A distinct label per run folder: its name, with parents prepended where two names clash."""
    labels = [p.name for p in paths]
    depth = 1
    while len(set(labels)) < len(labels) and depth < 8:
        depth += 1
        labels = ["/".join(p.parts[-depth:]) for p in paths]
    return labels


def report(folders: list[str | Path], out: str | Path | None = None) -> Path:
    """The `fedtune report` verb; returns the folder whose report is the answer (comparison.html or report.html).

    One run folder or one comparison folder: rebuilt in place. Several folders (runs, or comparisons whose runs
    are taken): each run rebuilt in place, and their comparison written to `out` (default ``runs/report``).
    """
    paths = [Path(f) for f in folders]
    for p in paths:
        if not p.is_dir():
            raise ValueError(f"fedtune report {p}: no such folder; give run folders (with metrics.jsonl) or "
                             "comparison folders (with comparison.json).")
        if not (is_run(p) or is_comparison(p)):
            raise ValueError(f"fedtune report {p}: not a run folder (metrics.jsonl and config.resolved.yaml) nor a "
                             "comparison folder (comparison.json).")
    if len(paths) == 1 and out is None:
        if is_comparison(paths[0]):
            rebuild_comparison(paths[0])
        else:
            rebuild_run(paths[0])
        return paths[0]
    runs: list[Path] = []
    for p in paths:
        if is_comparison(p) and not is_run(p):
            runs += [p / r["run"] for r in json.loads((p / "comparison.json").read_text())]
        else:
            runs.append(p)
    from .experiment import check_out

    target = check_out(out or "runs/report")
    target.mkdir(parents=True, exist_ok=True)
    rows, done = [], []
    for label, run_dir in zip(_labels(runs), runs):
        s = rebuild_run(run_dir)
        rows.append(row(label, {}, s))
        done.append((label, run_dir))
    (target / "comparison.json").write_text(json.dumps(rows, indent=2))
    names = ", ".join(re.sub(r"\s+", " ", str(p)) for p in paths)
    write_comparison(target, rows, done, [], f"fedtune report: {names}")
    return target
