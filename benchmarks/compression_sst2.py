"""Accuracy against cumulative bytes on SST-2 (examples/sst2-dirichlet.yaml) for fp32 FedAvg, compressed
updates and the server optimizers; every run in its own process, all at once on one GPU.

    python benchmarks/compression_sst2.py --data ../shared/data/sst2 --out runs/compression [--only fp32,topk]

Writes ``<out>/compression_sst2.json``: per run its settings, accuracy by round and cumulative bytes
(up + down) by round, and the bytes at which it first reached ``--target`` accuracy (null: never).
``--plot`` draws docs/compression-sst2.png from such a JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["federation.strategy=fedavg", "federation.server_lr=null", "train.lr=0.003", "eval.every=1",
          "train.count_flops=false"]
RUNS = {
    "fp32": [],
    "topk-0.01": ["compression.kind=topk", "compression.ratio=0.01"],
    "int8": ["compression.kind=int8"],
    "int4": ["compression.kind=int4"],
    "fedyogi": ["federation.strategy=fedyogi"],
    "fedadagrad": ["federation.strategy=fedadagrad"],
    "scaffold-sgd": ["federation.strategy=scaffold", "train.optimizer=sgd", "train.lr=1.0"],
    "fedavg-sgd": ["train.optimizer=sgd", "train.lr=1.0"],
}


def curve(folder: Path) -> dict:
    """Accuracy and cumulative bytes by round from a run folder's metrics.jsonl."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_round: dict[int, int] = {}
    for r in records:
        if r.get("type") == "client":
            per_round[r["round"]] = per_round.get(r["round"], 0) + r.get("bytes_up", 0) + r.get("bytes_down", 0)
    acc = {r["round"]: r["accuracy"] for r in records if r.get("type") == "eval"}
    total, cumulative = 0, {0: 0}
    for rnd in sorted(per_round):
        total += per_round[rnd]
        cumulative[rnd] = total
    return {"accuracy": {str(k): v for k, v in sorted(acc.items())},
            "bytes": {str(k): v for k, v in cumulative.items()}}


def first_reaching(c: dict, target: float) -> int | None:
    for rnd, a in c["accuracy"].items():
        if a >= target and rnd in c["bytes"]:
            return c["bytes"][rnd]
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/sst2")
    ap.add_argument("--out", default="runs/compression")
    ap.add_argument("--only", default=",".join(RUNS))
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--set", action="append", default=[], help="extra override for every run (a smoke test)")
    ap.add_argument("--plot", help="draw the plot from this JSON instead of running")
    a = ap.parse_args()
    if a.plot:
        return plot(Path(a.plot))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    start = time.time()
    for name in a.only.split(","):
        sets = [f"data.source={a.data}/train.tsv", f"data.test_source={a.data}/dev.tsv", f"name={name}",
                *COMMON, *RUNS[name], *a.set]
        cmd = [sys.executable, "-m", "fedtune.cli", "run", "examples/sst2-dirichlet.yaml", "--quiet",
               "--out", str(out / name), *[x for s in sets for x in ("--set", s)]]
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()), sets)
    results = {}
    for name, (p, sets) in procs.items():
        try:
            p.wait(timeout=max(1.0, a.timeout - (time.time() - start)))
        except subprocess.TimeoutExpired:
            p.kill()
        c = curve(out / name) if (out / name / "metrics.jsonl").exists() else {"accuracy": {}, "bytes": {}}
        c.update(settings=sets, returncode=p.returncode, bytes_to_target=first_reaching(c, a.target))
        if p.returncode not in (0, None):
            c["log_tail"] = (out / f"{name}.log").read_text()[-1500:]
        results[name] = c
    (out / "compression_sst2.json").write_text(json.dumps(
        {"what": "examples/sst2-dirichlet.yaml, FedAvg, client lr 3e-3 (AdamW) unless the run says otherwise, "
                 "every run in its own process, all at once", "overrides": a.set, "device": _device(),
         "target": a.target,
         "wall_s": time.time() - start, "runs": results}, indent=1))
    for name, c in results.items():
        print(name, c.get("returncode"), list(c["accuracy"].values())[-3:], c["bytes_to_target"])


def _device() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def plot(path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, c in d["runs"].items():
        if name not in ("fp32", "topk-0.01", "int8", "int4") or not c["accuracy"]:
            continue
        rounds = [r for r in c["accuracy"] if r in c["bytes"]]
        ax.plot([c["bytes"][r] / 2**20 for r in rounds], [c["accuracy"][r] for r in rounds], marker="o", ms=3,
                label=name)
    ax.axhline(d["target"], color="grey", ls="--", lw=0.8)
    fp32 = d["runs"].get("fp32", {}).get("bytes_to_target")
    if fp32:
        ax.axvline(0.1 * fp32 / 2**20, color="grey", ls=":", lw=0.8, label="0.1 x fp32's bytes to target")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MiB, up + down, all clients")
    ax.set_ylabel("SST-2 accuracy (300 dev rows)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path("docs") / "compression-sst2.png", dpi=120)


if __name__ == "__main__":
    main()
