"""`fedtune compare`: the same model, data, partition, seed and round budget under each framework.

Every run is an ordinary run folder under the comparison folder; the comparison
itself is `comparison.json` (one row per run), `comparison.md` and three plots.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402

from . import config as cfg  # noqa: E402
from . import registry  # noqa: E402
from .progress import console  # noqa: E402
from .report import MB, NOT_COUNTED, read_metrics, write_summary  # noqa: E402

DEFAULT_PARADIGMS = ("fedpeft", "kd", "split")


def parse_sweep(items: list[str]) -> list[tuple[str, list[Any]]]:
    """``key=v1,v2`` strings -> [(key, [v1, v2])]; values are read as YAML (numbers stay numbers)."""
    import yaml

    out = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise cfg.ConfigError(f"--sweep {item!r} must look like section.key=v1,v2 (e.g. peft.r=4,8,16).")
        out.append((key.strip(), [yaml.safe_load(v) for v in values.split(",")]))
    if len(out) > 2:
        raise cfg.ConfigError(f"--sweep takes at most two keys, got {len(out)}: {[k for k, _ in out]}.")
    return out


def plan(config_path: str | None, overrides: list[str], paradigms: list[str], sweep: list[tuple[str, list[Any]]]):
    """Every run of the comparison as (label, swept values, validated Config); all are checked before any runs."""
    for p in paradigms:
        if p not in registry.names():
            raise cfg.ConfigError(f"--paradigms: {p!r} is not one of {', '.join(registry.names())}.")
    runs = []
    grids = [[(k, v) for v in vs] for k, vs in sweep]  # no sweep: product() yields one empty point
    for point in itertools.product(*grids):
        for p in paradigms:
            sets = [f"federation.paradigm={p}"] + [f"{k}={json.dumps(v)}" for k, v in point]
            c = cfg.load(config_path, list(overrides) + sets)
            label = "-".join([p] + [f"{k.split('.')[-1]}={v}" for k, v in point])
            runs.append((label, dict(point), c))
    return runs


def row(label: str, swept: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    rounds = max(s["rounds"], 1)
    return {
        "run": label,
        "paradigm": s["paradigm"],
        "access": s.get("access"),
        "backprop": s.get("backprop"),
        **{k: v for k, v in swept.items()},
        "base_accuracy": s["base_accuracy"],
        "accuracy": s["accuracy"],
        "bytes_up": s["bytes_up"],
        "bytes_down": s["bytes_down"],
        "client_flops": s["client_flops"],
        "client_gflops_per_round": _per_round_gflops(s["client_flops"], rounds),
        "server_gflops_per_round": _per_round_gflops(s.get("server_flops", 0), rounds),
        "client_peak_memory_bytes": s["client_peak_memory_bytes"],
        "client_peak_memory_first_bytes": s.get("client_peak_memory_first_bytes"),
        "wall_time_s": s["wall_time_s"],
        "rounds": s["rounds"],
        "failed_client_rounds": s.get("failed_client_rounds", 0),
        "paradigm_metrics": s.get("paradigm_metrics", {}),
    }


def _per_round_gflops(flops: int | None, rounds: int) -> float | None:
    """GFLOPs per round; None when the run did not count FLOPs."""
    return None if flops is None else flops / 1e9 / rounds


COLUMNS = [
    ("run", "run", "{}"),
    ("access", "access", "{}"),
    ("backprop", "backprop", "yesno"),
    ("base acc", "base_accuracy", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("MB up", "bytes_up", "mb"),
    ("MB down", "bytes_down", "mb"),
    ("client GFLOPs/round", "client_gflops_per_round", "{:.1f}"),
    ("client peak MiB", "client_peak_memory_bytes", "mib"),
    ("1st-round peak MiB", "client_peak_memory_first_bytes", "mib"),
    ("server GFLOPs/round", "server_gflops_per_round", "{:.1f}"),
    ("wall s", "wall_time_s", "{:.0f}"),
    ("failed", "failed_client_rounds", "{}"),
]


def _cell(r: dict[str, Any], key: str, fmt: str) -> str:
    v = r.get(key)
    if v is None:
        return NOT_COUNTED if key.endswith("gflops_per_round") else "-"
    if fmt == "mb":
        return f"{v / MB:.2f}"
    if fmt == "yesno":
        return "yes" if v else "no"
    if fmt == "mib":
        return f"{v / 2**20:.0f}"
    return fmt.format(v)


def markdown(rows: list[dict[str, Any]], swept: list[str]) -> str:
    cols = COLUMNS[:1] + [(k, k, "{}") for k in swept] + COLUMNS[1:]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r, k, f) for _, k, f in cols) + " |" for r in rows]
    return "\n".join(lines)


def rich_table(rows: list[dict[str, Any]], swept: list[str]) -> Table:
    cols = COLUMNS[:1] + [(k, k, "{}") for k in swept] + COLUMNS[1:]
    t = Table(title="fedtune compare")
    for name, _, _ in cols:
        t.add_column(name, justify="left" if name == "run" else "right")
    for r in rows:
        t.add_row(*[_cell(r, k, f) for _, k, f in cols])
    return t


def curves(run_dir: Path) -> tuple[list[int], list[float], list[float]]:
    """(rounds, accuracy, cumulative MB up+down) of one run, round 0 being the base model."""
    records = read_metrics(run_dir)
    evals = {r["round"]: r["accuracy"] for r in records if r.get("type") == "eval"}
    traffic: dict[int, float] = {0: 0.0}
    total = 0.0
    for rnd in sorted({r["round"] for r in records if r.get("type") == "client"}):
        total += sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in records
                     if r.get("type") == "client" and r["round"] == rnd) / MB
        traffic[rnd] = total
    rounds = sorted(evals)
    return rounds, [evals[r] for r in rounds], [traffic.get(r, total) for r in rounds]


def plots(out: Path, runs: list[tuple[str, Path]], rows: list[dict[str, Any]]) -> None:
    """accuracy_vs_round.png, accuracy_vs_communication.png (log MB), compute_vs_accuracy.png."""
    out.mkdir(parents=True, exist_ok=True)
    fig1, ax1 = plt.subplots(figsize=(6, 4))
    fig2, ax2 = plt.subplots(figsize=(6, 4))
    access = {r["run"]: r.get("access") for r in rows}
    for label, path in runs:
        rounds, acc, mb = curves(path)
        seen = f"{label} ({access[label]}-box)" if access.get(label) else label
        ax1.plot(rounds, acc, marker="o", label=label)
        pts = [(m, a) for m, a in zip(mb, acc) if m > 0]
        if pts:
            ax2.plot([m for m, _ in pts], [a for _, a in pts], marker="o", label=seen)
    ax1.set(xlabel="round (0 = base model)", ylabel="accuracy", title="Accuracy per round")
    ax2.set(xlabel="cumulative MB up + down (log scale)", ylabel="accuracy", title="Accuracy vs communication")
    ax2.set_xscale("log")
    for fig, ax, name in ((fig1, ax1, "accuracy_vs_round.png"), (fig2, ax2, "accuracy_vs_communication.png")):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    if all(r["client_gflops_per_round"] is None for r in rows):
        ax.text(0.5, 0.5, "FLOPs not counted (train.count_flops: false)", ha="center", transform=ax.transAxes)
    for r in (r for r in rows if r["client_gflops_per_round"] is not None):
        ax.scatter(r["client_gflops_per_round"], r["accuracy"] or 0.0, s=40)
        ax.annotate(r["run"], (r["client_gflops_per_round"], r["accuracy"] or 0.0), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="client GFLOPs per round (all sampled clients)", ylabel="final accuracy",
           title="Client compute vs accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "compute_vs_accuracy.png", dpi=120)
    plt.close(fig)


def compare(
    config_path: str | None,
    *,
    overrides: list[str] | None = None,
    paradigms: list[str] | None = None,
    sweep: list[str] | None = None,
    out: str | Path = "runs/compare",
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Run every framework (x every sweep point) and write the comparison; returns its rows."""
    from .launch import run

    sweep_keys = parse_sweep(sweep or [])
    runs = plan(config_path, overrides or [], list(paradigms or DEFAULT_PARADIGMS), sweep_keys)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, done = [], []
    base_cache: dict[str, tuple[float, str]] = {}  # -> (base accuracy, the run that scored it)
    for i, (label, swept, c) in enumerate(runs, 1):
        if not quiet:
            console.rule(f"[bold]{i}/{len(runs)}: {label}")
        # The base model's score depends only on the model and the data: measure it once per pair.
        key = json.dumps([c.to_dict()["model"], c.to_dict()["data"], c.seed, c.eval.max_examples], sort_keys=True)
        known = base_cache.get(key)
        if known is not None:
            c.eval.base = False
        summary = run(c, out=out / label, quiet=quiet)
        if known is not None:
            # The run did not score the base (eval.base was off): its summary.json and report.md get the
            # comparison's number, so the run's own report agrees with the comparison table.
            summary["base_accuracy"], summary["base_accuracy_from"] = known
            write_summary(out / label, summary)
        elif summary["base_accuracy"] is not None:
            base_cache[key] = (summary["base_accuracy"], label)
        rows.append(row(label, swept, summary))
        done.append((label, out / label))
        # Written after every run, so an interrupted comparison keeps what finished.
        (out / "comparison.json").write_text(json.dumps(rows, indent=2))
    swept_names = [k for k, _ in sweep_keys]
    plots(out / "plots", done, rows)
    md = [f"# fedtune compare: `{config_path or 'defaults'}`", "", markdown(rows, swept_names), "",
          "![accuracy per round](plots/accuracy_vs_round.png)",
          "![accuracy vs communication](plots/accuracy_vs_communication.png)",
          "![client compute vs accuracy](plots/compute_vs_accuracy.png)", "",
          "MB are exact encoded bytes over the whole run; GFLOPs are counted on the real steps "
          "(client: all sampled clients of a round together; \"not counted\" with train.count_flops: false). "
          "Client peak MiB is the largest of the rounds after the first; the first round's includes one-time "
          "warm-up.", ""]
    (out / "comparison.md").write_text("\n".join(md))
    if not quiet:
        console.print(rich_table(rows, swept_names))
        console.print(f"comparison written to {out}/comparison.md")
    return rows
