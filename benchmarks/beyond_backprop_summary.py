"""Summarise run folders of the beyond-backprop paradigms into one JSON (the figures docs/paradigms-beyond-backprop.md quotes).

For each run folder: the paradigm, the overrides that differ from the demo config, the accuracy curve
(round 0 = base), the per-round mean client training loss (first and last step too), bytes up and down
per client-round (client-server), the API traffic per client-round (FedBPT), client FLOPs per
client-round, wall seconds, and ``paradigm_metrics``.

    python benchmarks/beyond_backprop_summary.py runs/a runs/b --machine "2-core CPU, shared" --out benchmarks/x.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(folder: Path) -> dict:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
    clients = [r for r in records if r.get("type") == "client" and r.get("status", "ok") == "ok"]
    rounds = sorted({r["round"] for r in clients})
    per_round = []
    for rnd in rounds:
        cs = [r for r in clients if r["round"] == rnd]
        per_round.append({
            "round": rnd, "clients": len(cs), "train_loss": mean([r.get("train_loss") for r in cs]),
            "train_loss_first": mean([r.get("train_loss_first") for r in cs]),
            "train_loss_last": mean([r.get("train_loss_last") for r in cs]),
            "bytes_up": mean([r.get("bytes_up") for r in cs]), "bytes_down": mean([r.get("bytes_down") for r in cs]),
            "api_bytes_up": mean([r.get("api_bytes_up") for r in cs]),
            "api_bytes_down": mean([r.get("api_bytes_down") for r in cs]),
            "client_gflops": mean([(r.get("flops") or 0) / 1e9 for r in cs]),
            "seconds": mean([r.get("seconds") for r in cs]),
        })
    evals = [{"round": r["round"], "accuracy": r["accuracy"], **({"model": r["model"]} if "model" in r else {})}
             for r in records if r.get("type") == "eval"]
    cfg = (folder / "config.resolved.yaml").read_text() if (folder / "config.resolved.yaml").exists() else ""
    return {"run": folder.name, "paradigm": summary.get("paradigm"), "accuracy_curve": evals,
            "per_round": per_round, "bytes_up_per_client_round": mean([r.get("bytes_up") for r in clients]),
            "bytes_down_per_client_round": mean([r.get("bytes_down") for r in clients]),
            "wall_seconds": summary.get("wall_seconds") or summary.get("seconds"),
            "paradigm_metrics": summary.get("paradigm_metrics", {}), "config": cfg}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--machine", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = {"machine": a.machine, "runs": [summarise(Path(f)) for f in a.folders]}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    for r in out["runs"]:
        print(r["run"], [(e["round"], e["accuracy"]) for e in r["accuracy_curve"]], r["bytes_up_per_client_round"])


if __name__ == "__main__":
    main()
