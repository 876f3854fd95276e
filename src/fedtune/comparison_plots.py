"""The comparison's static plots (plots/*.png of `fedtune compare` and `fedtune report`): accuracy per round,
accuracy against communication, client compute against accuracy; comparison.html draws the same interactively."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import MB, read_metrics  # noqa: E402


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
