"""The responsible-FedLLM table (docs/responsible.md) from two `fedtune compare` folders.

    python benchmarks/responsible.py runs/responsible-clean runs/responsible \
        --json benchmarks/responsible_cpu.json --plot docs/img/responsible.png

The first folder is the comparison on clean data (safety.harmful_fraction=0), the others hold the sweep at 30%
harmful client data (safety.filter x safety.cai; one folder, or one per sweep point when its runs were
started side by side); all come from examples/responsible.yaml (its first lines give the commands,
`make responsible` runs them). Rows: the base model, FedAvg clean, FedAvg 30% harmful,
+ filter, + CAI, + both, each with the AdvBench harmless rate, the benign metric (ROUGE-L of the
support-desk replies), what the filter dropped and the CAI step's cost.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {("none", False): "FedAvg, 30% harmful", ("trained", False): "+ filter", ("none", True): "+ CAI",
          ("trained", True): "+ filter + CAI"}


def table(clean_dir: Path, harmful_dirs: list[Path]) -> list[dict]:
    """The rows of the table, from the comparisons' comparison.json."""
    sweep = [r for d in harmful_dirs for r in json.loads((d / "comparison.json").read_text())]
    sweep.sort(key=lambda r: (r.get("safety.cai", False), r.get("safety.filter", "none") != "none"))
    clean = json.loads((clean_dir / "comparison.json").read_text())
    first = next(r for r in clean + sweep if r.get("base_harmless_rate") is not None)
    rows = [{"row": "base model", "harmless_rate": first["base_harmless_rate"], "benign": first["base_accuracy"],
             "wall_s": None}]
    for r in clean:
        rows.append({"row": "FedAvg, clean data", "harmless_rate": r["harmless_rate"], "benign": r["accuracy"],
                     "wall_s": r["wall_time_s"]})
    for r in sweep:
        key = (r.get("safety.filter", "none"), bool(r.get("safety.cai", False)))
        rows.append({"row": LABELS.get(key, r["run"]), "harmless_rate": r["harmless_rate"], "benign": r["accuracy"],
                     "filter_dropped": r.get("filter_dropped"),
                     "filter_flagged_harmful": r.get("filter_flagged_harmful"),
                     "filter_flagged_benign": r.get("filter_flagged_benign"),
                     "filter_harmful_seen": r.get("filter_harmful_seen"), "cai_seconds": r.get("cai_seconds"),
                     "cai_reviser": r.get("cai_reviser"), "wall_s": r["wall_time_s"]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | AdvBench harmless rate | ROUGE-L (benign) | filter: flagged harmful / benign | CAI s "
             "| wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        filt = (f"{r['filter_flagged_harmful']}/{r['filter_harmful_seen']} / {r['filter_flagged_benign']}"
                if r.get("filter_dropped") is not None else "-")
        cai = f"{r['cai_seconds']:.0f}" if r.get("cai_seconds") else "-"
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") else "-"
        lines.append(f"| {r['row']} | {r['harmless_rate']:.3f} | {r['benign']:.3f} | {filt} | {cai} | {wall} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["harmless_rate"] for r in rows], 0.4, label="AdvBench harmless rate")
    ax.bar([i + 0.2 for i in x], [r["benign"] for r in rows], 0.4, label="ROUGE-L (benign task)")
    ax.set_xticks(list(x), [r["row"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Responsible FedLLM on SmolLM2-135M-Instruct (CPU budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clean", type=Path)
    p.add_argument("harmful", type=Path, nargs="+")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    a = p.parse_args()
    rows = table(a.clean, a.harmful)
    print(markdown(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    if a.plot:
        plot(rows, a.plot)


if __name__ == "__main__":
    main()
