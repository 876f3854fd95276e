"""Pages a person opens in a browser: report.html beside a run's report.md, comparison.html beside comparison.md.

Each page is one self-contained file: the tables as HTML, the plots as interactive plotly charts with plotly.js
inlined once per page (~4.7 MB), so it opens offline, from anywhere, with nothing else beside it. Everything on
it is read from the run folders (summary.json, metrics.jsonl, partition.json), so `fedtune report` rebuilds it
without running anything.
"""

from __future__ import annotations

import html
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .report import MB, read_metrics, summary_rows

PARTITION_FILE = "partition.json"
"""Per-client example counts by label (or by the partition key), written when a run starts."""

ACCESS = {"white": "white-box: clients hold the weights and backpropagate",
          "gray": "gray-box: clients train on an emulator; the full model never leaves the server",
          "black": "black-box: clients see only losses/logits from an inference service"}


def write_partition(path: Path, parts: Sequence[Sequence[int]], keys: Sequence[str]) -> None:
    """``partition.json``: for each client, how many of its training examples carry each key (label)."""
    values = sorted(set(keys), key=str)
    clients = {str(i): {v: n for v in values if (n := Counter(keys[j] for j in part).get(v, 0))}
               for i, part in enumerate(parts)}
    (path / PARTITION_FILE).write_text(json.dumps({"keys": values, "clients": clients}, indent=1))


def read_partition(path: Path) -> dict[str, Any] | None:
    f = path / PARTITION_FILE
    return json.loads(f.read_text()) if f.is_file() else None


# --------------------------------------------------------------------------- page pieces


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1rem; }
.plots > div { min-width: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8rem; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.6rem 0.9rem; min-width: 200px; }
.access-white { border-left: 6px solid #3b7dd8; } .access-gray { border-left: 6px solid #888; }
.access-black { border-left: 6px solid #222; }
.note { color: #555; font-size: 0.85rem; }
"""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[str]], table_id: str) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _figure(fig, div_id: str) -> str:
    fig.update_layout(template="plotly_white", autosize=True, margin=dict(l=60, r=20, t=60, b=90),
                      legend=dict(font=dict(size=10), orientation="h", y=-0.3), title=dict(font=dict(size=14)))
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, default_width="100%",
                       default_height="400px", config={"displaylogo": False, "responsive": True})


def _page(title: str, body: str) -> str:
    import plotly.offline

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_STYLE}</style>"
            f"<script type=\"text/javascript\">{plotly.offline.get_plotlyjs()}</script></head>"
            f"<body>{body}</body></html>\n")


def curves(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per evaluated round (0 = the base model): accuracy, cumulative MB up + down, cumulative client GFLOPs
    (None where FLOPs were not counted)."""
    evals = {r["round"]: r["accuracy"] for r in records if r.get("type") == "eval"}
    clients = [r for r in records if r.get("type") == "client"]
    mb, gflops, total_mb, total_flops, counted = {0: 0.0}, {0: 0.0}, 0.0, 0.0, True
    for rnd in sorted({r["round"] for r in clients}):
        rs = [r for r in clients if r["round"] == rnd]
        total_mb += sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in rs) / MB
        flops = [r.get("flops") for r in rs if r.get("status") == "ok"]
        counted = counted and all(f is not None for f in flops)
        total_flops += sum(f or 0 for f in flops) / 1e9
        mb[rnd], gflops[rnd] = total_mb, total_flops
    rounds = sorted(evals)

    def at(series: dict[int, float], rnd: int, last: float) -> float:
        return series.get(rnd, last)

    return {"round": rounds, "accuracy": [evals[r] for r in rounds],
            "mb": [at(mb, r, total_mb) for r in rounds],
            "gflops": [at(gflops, r, total_flops) if counted else None for r in rounds]}


def _label_histogram(partition: dict[str, Any] | None, div_id: str, title: str) -> str:
    import plotly.graph_objects as go

    if not partition:
        return '<p class="note">No partition.json in this run folder (runs before fedtune wrote one).</p>'
    clients = sorted(partition["clients"], key=int)
    fig = go.Figure([go.Bar(name=str(k), x=[f"client {c}" for c in clients],
                            y=[partition["clients"][c].get(k, 0) for c in clients]) for k in partition["keys"]])
    fig.update_layout(barmode="stack", title=title, xaxis_title="client", yaxis_title="training examples")
    return _figure(fig, div_id)


# --------------------------------------------------------------------------- report.html


def run_page(path: Path) -> Path:
    """Write ``report.html`` of a finished run folder (summary.json and metrics.jsonl) and return its path."""
    import plotly.graph_objects as go

    s = json.loads((path / "summary.json").read_text())
    records = read_metrics(path)
    c = curves(records)
    metric = s.get("metric", "accuracy")
    figs = []
    fig = go.Figure(go.Scatter(x=c["round"], y=c["accuracy"], mode="lines+markers", name=s["paradigm"]))
    fig.update_layout(title=f"Global model {metric} per round", xaxis_title="round (0 = base model)",
                      yaxis_title=metric)
    figs.append(_figure(fig, "plot-accuracy"))
    fig = go.Figure(go.Scatter(x=c["mb"], y=c["accuracy"], mode="lines+markers", name=s["paradigm"]))
    fig.update_layout(title=f"{metric} vs cumulative communication", xaxis_title="cumulative MB up + down",
                      yaxis_title=metric)
    figs.append(_figure(fig, "plot-communication"))
    fig = go.Figure(go.Scatter(x=c["gflops"], y=c["accuracy"], mode="lines+markers", name=s["paradigm"]))
    fig.update_layout(title=f"Client compute vs {metric}", xaxis_title="cumulative client GFLOPs (all clients)",
                      yaxis_title=metric)
    figs.append(_figure(fig, "plot-compute"))
    figs.append(_label_histogram(read_partition(path), "plot-labels", "Examples per client, by label"))
    clients = [r for r in records if r.get("type") == "client"]
    per_client = [[str(r["round"]), str(r.get("client")), r.get("status", ""), f"{r.get('bytes_up', 0) / MB:.3f}",
                   f"{r.get('bytes_down', 0) / MB:.3f}",
                   "-" if r.get("train_loss") is None else f"{r['train_loss']:.4f}",
                   "-" if r.get("update_norm") is None else f"{r['update_norm']:.4f}",
                   "-" if r.get("flops") is None else f"{r['flops'] / 1e9:.2f}"] for r in clients]
    access = s.get("access") or "white"
    body = (f"<h1>fedtune run <code>{_esc(s['name'])}</code></h1>"
            f'<p class="note">{_esc(s["paradigm"])} on {_esc(s["model"])}, {s["rounds"]} rounds, '
            f'{s["clients_per_round"]} of {s["num_clients"]} clients a round; {_esc(ACCESS.get(access, access))}.</p>'
            "<h2>Summary</h2>" + _table(["metric", "value"], [list(r) for r in summary_rows(s)], "summary")
            + "<h2>Plots</h2><div class=\"plots\">" + "".join(f"<div>{f}</div>" for f in figs) + "</div>"
            + "<h2>Client rounds</h2>"
            + _table(["round", "client", "status", "MB up", "MB down", "train loss", "update norm", "GFLOPs"],
                     per_client, "clients")
            + '<p class="note">From metrics.jsonl: one line per client-round. Rebuild with '
            "<code>fedtune report RUN_DIR</code>.</p>")
    out = path / "report.html"
    out.write_text(_page(f"fedtune run {s['name']}", body))
    return out


# --------------------------------------------------------------------------- comparison.html


def _card(r: dict[str, Any]) -> str:
    """One framework's box: its access level, whether clients backpropagate, its accuracy and traffic."""
    access = r.get("access") or ""
    accuracy = "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
    return (f'<div class="card access-{_esc(access)}"><b>{_esc(r["run"])}</b><br>'
            f'{_esc(ACCESS.get(access, "access not recorded"))}<br>'
            f'backprop on clients: {"yes" if r.get("backprop", True) else "no"}<br>'
            f'accuracy {accuracy}, {(r["bytes_up"] + r["bytes_down"]) / MB:.2f} MB up + down</div>')


def comparison_page(out: Path, rows: list[dict[str, Any]], runs: list[tuple[str, Path]],
                    table: tuple[list[str], list[list[str]]], title: str) -> Path:
    """Write ``comparison.html`` into `out`: the comparison table (`table`: header and cells, as in
    comparison.md), the frameworks side by side with their access level, and the plots; returns its path."""
    import plotly.graph_objects as go

    by_run = {r["run"]: r for r in rows}
    acc, comm, comp = go.Figure(), go.Figure(), go.Figure()
    for label, path in runs:
        c = curves(read_metrics(path))
        access = by_run.get(label, {}).get("access")
        name = f"{label} ({access}-box)" if access else label
        acc.add_trace(go.Scatter(x=c["round"], y=c["accuracy"], mode="lines+markers", name=name))
        pts = [(m, a) for m, a in zip(c["mb"], c["accuracy"]) if m > 0]
        comm.add_trace(go.Scatter(x=[m for m, _ in pts], y=[a for _, a in pts], mode="lines+markers", name=name))
    counted = [r for r in rows if r.get("client_gflops_per_round") is not None]
    comp.add_trace(go.Scatter(x=[r["client_gflops_per_round"] for r in counted],
                              y=[r["accuracy"] or 0.0 for r in counted], mode="markers+text",
                              text=[r["run"] for r in counted], textposition="top center",
                              marker=dict(size=12), name="runs"))
    acc.update_layout(title="Accuracy per round", xaxis_title="round (0 = base model)", yaxis_title="accuracy")
    comm.update_layout(title="Accuracy vs communication", xaxis_title="cumulative MB up + down (log scale)",
                       yaxis_title="accuracy", xaxis_type="log")
    comp.update_layout(title="Client compute vs accuracy", xaxis_title="client GFLOPs per round (all sampled clients)",
                       yaxis_title="final accuracy", showlegend=False)
    figs = [_figure(acc, "plot-accuracy"), _figure(comm, "plot-communication"), _figure(comp, "plot-compute")]
    partitions = {label: read_partition(path) for label, path in runs}
    distinct = {json.dumps(p, sort_keys=True) for p in partitions.values() if p}
    if len(distinct) <= 1:
        first = next((p for p in partitions.values() if p), None)
        figs.append(_label_histogram(first, "plot-labels", "Examples per client, by label (every run)"))
    else:
        figs += [_label_histogram(p, f"plot-labels-{i}", f"{label}: examples per client, by label")
                 for i, (label, p) in enumerate(partitions.items())]
    cards = "".join(_card(r) for r in rows)
    header, cells = table
    body = (f"<h1>{_esc(title)}</h1>"
            "<h2>Summary</h2>" + _table(header, cells, "comparison")
            + '<p class="note">MB are exact encoded bytes over the whole run; GFLOPs are counted on the real steps; '
            "client peak MiB is the largest of the rounds after the first.</p>"
            "<h2>Frameworks side by side</h2><div class=\"cards\">" + cards + "</div>"
            + "<h2>Plots</h2><div class=\"plots\">" + "".join(f"<div>{f}</div>" for f in figs) + "</div>"
            + '<p class="note">Each run\'s own page: ' + " ".join(
                f'<a href="{_esc(os.path.relpath(path / "report.html", out))}">{_esc(label)}</a>'
                for label, path in runs) + "</p>")
    page = out / "comparison.html"
    page.write_text(_page(title, body))
    return page
