"""Run outputs a person can open: summary.json, plots/*.png, report.md, and the final table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402

from . import registry  # noqa: E402

MB = 1e6


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``."""
    with open(path / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


WARM_UP_NOTE = (
    "The first-round client peak includes one-time warm-up on the first client a process trains (on CUDA likely "
    "the CUDA-graph capture and its memory pool, cuBLAS workspaces and the first optimizer state), so the client "
    "peak memory is the largest of the later rounds."
)
"""What report.md says about the two client peak-memory figures."""


def total_flops(records: list[dict[str, Any]], counted: bool = True) -> int | None:
    """Sum of the records' ``flops``; None when FLOPs were not counted.

    Not counted: the run had ``train.count_flops: false`` (`counted`), or the records carry FLOPs and every one
    is null. No records, with counting on, is 0.
    """
    values = [r.get("flops") for r in records]
    if not counted or (values and all(v is None for v in values)):
        return None
    return sum(v or 0 for v in values)


def client_peak_memory(ok: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    """(steady-state peak, first-round peak) in bytes over the clients' successful records.

    The first round's clients include the warm-up of the first client each process trains (`WARM_UP_NOTE`),
    which on CUDA was ~10x the steady state (5.6 GiB vs 562 MiB on the 135M model), so the steady-state peak is
    the largest of the rounds after the first one with client records; None when there is no later round. The
    first-round peak is the largest of that first round; None without records.
    """
    if not ok:
        return None, None
    first = min(r["round"] for r in ok)
    later = [r.get("peak_memory_bytes", 0) for r in ok if r["round"] > first]
    return (max(later) if later else None), max(r.get("peak_memory_bytes", 0) for r in ok if r["round"] == first)


def summarize(records: list[dict[str, Any]], config: dict[str, Any], base_accuracy, wall_time_s: float):
    """Run totals computed from the per-client-round records."""
    clients = [r for r in records if r.get("type") == "client"]
    ok = [r for r in clients if r.get("status") == "ok"]
    counted = bool(config.get("train", {}).get("count_flops", True))
    steady_peak, first_peak = client_peak_memory(ok)
    evals = [r for r in records if r.get("type") == "eval" and r.get("model") != "base"]
    fed, data = config["federation"], config["data"]
    metric = data.get("metric") or ("accuracy" if data["task"] == "classification" else "rouge_l")
    spec = registry.get(fed["paradigm"])
    return {
        "name": config["name"],
        "paradigm": fed["paradigm"],
        "access": spec.access,
        "backprop": spec.backprop,
        "strategy": spec.strategy_label or fed["strategy"],
        "model": config["model"]["name"],
        "metric": metric,
        "rounds": fed["rounds"],
        "num_clients": 1 if spec.single_client else fed["num_clients"],
        "clients_per_round": 1 if spec.single_client else fed["clients_per_round"],
        "base_accuracy": base_accuracy,
        "accuracy": evals[-1]["accuracy"] if evals else None,
        "accuracy_by_round": {str(r["round"]): r["accuracy"] for r in evals},
        "client_accuracy": client_accuracy(ok),
        "bytes_up": sum(r.get("bytes_up", 0) for r in clients),
        "bytes_down": sum(r.get("bytes_down", 0) for r in clients),
        "client_flops": total_flops(ok, counted),
        "client_peak_memory_bytes": steady_peak,
        "client_peak_memory_first_bytes": first_peak,
        "client_seconds": sum(r.get("seconds", 0.0) for r in ok),
        "server_flops": total_flops([r for r in records if r.get("type") == "server"], counted),
        "client_rounds": len(clients),
        "failed_client_rounds": len(clients) - len(ok),
        "wall_time_s": wall_time_s,
        "paradigm_metrics": paradigm_metrics(records),
        **feature_fields(records, evals),
    }


EVAL_FIELDS = ("epsilon", "delta", "noise_multiplier", "backdoor_asr")
"""What features add to evaluation records (`fedtune.privacy`, `fedtune.attacks`); the summary keeps the last."""


def feature_fields(records: list[dict[str, Any]], evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary's fields from features: the last evaluation's `EVAL_FIELDS`, and the simulated attack
    (``attack``: its ``type: attack`` record), each only when the run has it."""
    out = {k: evals[-1][k] for k in EVAL_FIELDS if evals and k in evals[-1]}
    attack = next((r for r in records if r.get("type") == "attack"), None)
    if attack is not None:
        out["attack"] = {k: v for k, v in attack.items() if k != "type"}
    return out


def client_accuracy(ok_clients: list[dict[str, Any]]) -> float | None:
    """KD: the mean accuracy of the clients' own models on the test set, over the clients that reported one
    (the last round's); None when none did."""
    scores = [r["client_accuracy"] for r in ok_clients if r.get("client_accuracy") is not None]
    return sum(scores) / len(scores) if scores else None


def paradigm_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What a paradigm reports of its own (records of type ``paradigm``, e.g. offsite's emulator accuracy,
    FedBPT's API traffic): the last value of each field, and ``<field>_total``, the sum over the run, of the
    numeric ``api_*`` fields (per-round traffic and calls)."""
    out: dict[str, Any] = {}
    totals: dict[str, float] = {}
    for r in (r for r in records if r.get("type") == "paradigm"):
        for k, v in r.items():
            if k in ("type", "round"):
                continue
            out[k] = v
            if k.startswith("api_") and isinstance(v, (int, float)) and not isinstance(v, bool):
                totals[k + "_total"] = totals.get(k + "_total", 0) + v
    return {**out, **totals}


def plot(records: list[dict[str, Any]], out: Path) -> None:
    """accuracy.png (accuracy vs round) and communication.png (cumulative MB vs round)."""
    out.mkdir(parents=True, exist_ok=True)
    evals = [r for r in records if r.get("type") == "eval"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["round"] for r in evals], [r["accuracy"] for r in evals], marker="o")
    ax.set(xlabel="round (0 = base model)", ylabel="accuracy", title="Global model accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    rounds = sorted({r["round"] for r in records if r.get("type") == "client"})
    up = down = 0.0
    cum_up, cum_down = [], []
    for rnd in rounds:
        rs = [r for r in records if r.get("type") == "client" and r["round"] == rnd]
        up += sum(r.get("bytes_up", 0) for r in rs) / MB
        down += sum(r.get("bytes_down", 0) for r in rs) / MB
        cum_up.append(up)
        cum_down.append(down)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(rounds, cum_up, marker="o", label="up (clients -> server)")
    ax.plot(rounds, cum_down, marker="s", label="down (server -> clients)")
    ax.set(xlabel="round", ylabel="cumulative MB", title="Communication")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "communication.png", dpi=120)
    plt.close(fig)


NOT_COUNTED = "not counted"
"""How a FLOP figure reads when the run did not count FLOPs (``train.count_flops: false``)."""


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}"


def gflops(flops: int | None) -> str:
    """FLOPs as GFLOPs with one decimal, or "not counted" for None."""
    return NOT_COUNTED if flops is None else f"{flops / 1e9:.1f}"


def _mib(v: int | None, missing: str = "-") -> str:
    return missing if v is None else f"{v / 2**20:.0f} MiB"


def _base(s: dict[str, Any]) -> str:
    source = s.get("base_accuracy_from")
    return _fmt(s["base_accuracy"]) + (f" (scored once for the comparison, in run `{source}`)" if source else "")


def summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("paradigm", f"{s['paradigm']} ({s['strategy']})"),
        ("base accuracy", _base(s)),
        (f"final {s['metric']}", _fmt(s["accuracy"])),
        *([("clients' own models (mean)", _fmt(s["client_accuracy"]))] if s.get("client_accuracy") is not None else []),
        ("MB up / down", f"{s['bytes_up'] / MB:.2f} / {s['bytes_down'] / MB:.2f}"),
        ("client GFLOPs (total)", gflops(s["client_flops"])),
        ("server GFLOPs (total)", gflops(s.get("server_flops", 0))),
        ("client peak memory", _mib(s["client_peak_memory_bytes"], "- (one round: see the first round's)")),
        ("client peak memory, first round", _mib(s.get("client_peak_memory_first_bytes"))),
        ("client time (total)", f"{s['client_seconds']:.1f} s"),
        ("wall time", f"{s['wall_time_s']:.1f} s"),
        *([("differential privacy", f"epsilon {s['epsilon']:.3g} at delta {s['delta']:.3g}")] if "epsilon" in s else []),
        *([("SIMULATED ATTACK", f"{s['attack']['kind']}, malicious clients {s['attack']['malicious']}")]
          if "attack" in s else []),
        *([("backdoor attack success rate", _fmt(s["backdoor_asr"]))] if "backdoor_asr" in s else []),
    ]


def table(s: dict[str, Any]) -> Table:
    t = Table(title=f"fedtune run: {s['name']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in summary_rows(s):
        t.add_row(k, v)
    return t


def write_summary(path: Path, s: dict[str, Any]) -> None:
    """Write a run's summary.json and report.md from its summary (again, when a comparison amends it)."""
    (path / "summary.json").write_text(json.dumps(s, indent=2))
    lines = [f"# fedtune run `{s['name']}`", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(s)]
    lines += ["", WARM_UP_NOTE, "",
              "![accuracy](plots/accuracy.png) ![communication](plots/communication.png)", "",
              "Interactive plots, per-client rounds and label histograms: `report.html`.", "",
              "Files: `config.resolved.yaml`, `metrics.jsonl` (one line per client-round and evaluation), "
              "`summary.json`, `adapter/` (PEFT format).", ""]
    (path / "report.md").write_text("\n".join(lines))


def write_outputs(path: Path, config, base_accuracy, evaluations, wall_time_s: float, bars) -> dict[str, Any]:
    """Write summary.json, plots/ and report.md for a finished run, print the table, return the summary."""
    records = read_metrics(path)
    s = summarize(records, config.to_dict(), base_accuracy, wall_time_s)
    plot(records, path / "plots")
    write_summary(path, s)
    bars.print(table(s))
    bars.print(f"run folder: {path}")
    return s
