"""`fedtune advise`: which federated fine-tuning framework fits a federation's constraints, from measured numbers.

The constraints are what a deployment cannot change: how much memory a client has, how many bytes a client may
send per round, what a client may see of the model (white: weights; gray: an emulator; black: only an inference
API), whether the server can be reached at every training step or only between rounds, and a privacy budget.
The numbers are measured ones: rows of `fedtune compare` folders, or the table bundled with fedtune (measured on
the demo task; docs/results.md and docs/paradigms-beyond-backprop.md). Every framework that fits is ranked by
its measured accuracy gain over the base model (then accuracy, then fewer bytes up), and every verdict says why,
citing the numbers it rests on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

ACCESS_ORDER = {"black": 0, "gray": 1, "white": 2}
"""What a client sees, from least to most: a client allowed `white` may also run gray- and black-box methods."""

EVERY_STEP = {
    "split": "its main server runs the top of the model at every local step of every client",
    "fedbpt": "its model service scores every candidate prompt of every client",
}
"""Frameworks whose clients need a server at every training step, and why (the others talk once a round)."""

UPDATE_DP = {
    "fedpeft": "client-level DP applies to the averaged adapter updates",
    "fedprox": "client-level DP applies to the averaged adapter updates",
    "offsite": "client-level DP applies to the averaged emulator adapters",
}
"""Frameworks whose only client output is an averaged update, so client-level DP (clip + noise) covers it."""

NO_DP = {
    "split": "cut-layer activations and labels leave the client at every step, outside update-level DP",
    "kd": "logits on the public prompts leave the client; update-level DP does not cover them",
    "fedkseed": "per-step (seed, scalar) loss differences leave the client; fedtune has no DP accounting for them",
    "fedbpt": "every candidate's losses come back from the model service; fedtune has no DP accounting for them",
    "centralized": "the data leaves the clients",
}

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str, flag: str) -> float:
    """``"2GiB"``, ``"600 MiB"``, ``"1.5MB"``, ``"4096"`` (bytes) -> bytes; ValueError naming `flag` otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"{flag} {text!r} is not a size: give a number of bytes with an optional unit "
                         "(B, KB, MB, GB, KiB, MiB, GiB), e.g. 2GiB or 500KB.")
    return float(m.group(1)) * _UNITS[unit]


def human(n: float | None, binary: bool = False) -> str:
    """Bytes as a reader says them: decimal units for traffic, binary ones (MiB, GiB) for memory."""
    if n is None:
        return "-"
    units = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if binary else (("GB", 1e9), ("MB", 1e6), ("KB", 1e3))
    for unit, size in units:
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass
class Constraints:
    """What a federation cannot change; None: no constraint."""

    client_memory: float | None = None
    """Bytes a client can give to training."""
    uplink: float | None = None
    """Bytes a client may send per round."""
    access: str = "white"
    """The most a client may see of the model: white (weights), gray (an emulator), black (an inference API)."""
    server_every_step: bool = True
    """Whether the server can be reached at every local step (False: only between rounds)."""
    epsilon: float | None = None
    """A client-level differential-privacy budget."""

    def __post_init__(self) -> None:
        if self.access not in ACCESS_ORDER:
            raise ValueError(f"--access {self.access!r} is not allowed: white, gray or black.")
        for name, v in (("--client-memory", self.client_memory), ("--uplink", self.uplink),
                        ("--epsilon", self.epsilon)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} {v} is not allowed: a positive number.")


@dataclass
class Verdict:
    """One measured row, judged: whether it fits, and the reasons (each citing a number)."""

    row: dict[str, Any]
    fits: bool
    reasons: list[str] = field(default_factory=list)
    """One per constraint, fitting or not, each citing the measured number."""
    fails: list[str] = field(default_factory=list)
    """The reasons it does not fit (a subset of `reasons`)."""

    @property
    def gain(self) -> float | None:
        a, b = self.row.get("accuracy"), self.row.get("base_accuracy")
        return None if a is None or b is None else a - b


def judge(row: dict[str, Any], c: Constraints) -> Verdict:
    """Whether one measured row fits the constraints, with a reason per constraint (fit or not)."""
    why: list[str] = []
    fails: list[str] = []

    def fail(reason: str) -> None:
        why.append(reason)
        fails.append(reason)
    p, access = row["paradigm"], row.get("access") or "white"
    if ACCESS_ORDER[access] > ACCESS_ORDER[c.access]:
        fail(f"needs {access}-box access; clients may see at most {c.access}-box")
    else:
        why.append(f"{access}-box (allowed: up to {c.access}-box)")
    if p in EVERY_STEP:
        if not c.server_every_step:
            fail(f"needs the server at every step: {EVERY_STEP[p]}")
        else:
            why.append("needs the server at every step (allowed)")
    else:
        why.append("talks to the server once a round")
    up = row.get("up_bytes_per_client_round")
    if c.uplink is not None:
        if up is None:
            fail("uplink not measured")
        elif up > c.uplink:
            fail(f"sends {human(up)} up per client-round, over the {human(c.uplink)} allowed")
        else:
            why.append(f"sends {human(up)} up per client-round (<= {human(c.uplink)})")
    mem = row.get("client_memory_bytes")
    note = f" ({row['memory_note']})" if row.get("memory_note") else ""
    if c.client_memory is not None:
        if mem is None:
            fail("client memory not measured")
        elif mem > c.client_memory:
            fail(f"a client needs {human(mem, True)}{note}, over the {human(c.client_memory, True)} available")
        else:
            why.append(f"a client needs {human(mem, True)}{note} (<= {human(c.client_memory, True)})")
    if c.epsilon is not None:
        eps = row.get("epsilon")
        if p in NO_DP or p not in UPDATE_DP:
            fail(f"no client-level DP: {NO_DP.get(p, 'fedtune has no DP accounting for it')}")
        elif eps is not None and eps > c.epsilon:
            fail(f"measured at epsilon {eps:g}, over the budget {c.epsilon:g}")
        elif eps is not None:
            why.append(f"measured at epsilon {eps:g} (<= {c.epsilon:g})")
        else:
            why.append(f"{UPDATE_DP[p]}; its accuracy was measured without DP noise, expect less at epsilon "
                       f"{c.epsilon:g} (measure it: fedtune compare with the privacy section)")
    gain = None if row.get("accuracy") is None or row.get("base_accuracy") is None else \
        row["accuracy"] - row["base_accuracy"]
    if gain is not None and gain <= 0:
        why.append("it did not improve on the base model in this measurement")
    return Verdict(row, not fails, why, fails)


def _reference(paradigm: str | None) -> bool:
    """The centralized baseline (one client holds all the data): what the others are measured against."""
    from . import config  # noqa: F401  (registers the paradigms)
    from . import registry

    return paradigm in registry.names() and registry.get(paradigm).single_client


def rank(rows: list[dict[str, Any]], c: Constraints) -> tuple[list[Verdict], list[Verdict]]:
    """``(fitting rows best first, rows that do not fit)``: best = largest accuracy gain over the base, then
    highest accuracy, then fewest bytes up. The centralized baseline is a reference, never a candidate."""
    verdicts = [judge(r, c) for r in rows if not _reference(r.get("paradigm"))]
    fit = [v for v in verdicts if v.fits]
    fit.sort(key=lambda v: (-(v.gain if v.gain is not None else -1e9), -(v.row.get("accuracy") or 0.0),
                            v.row.get("up_bytes_per_client_round") or 0.0))
    return fit, [v for v in verdicts if not v.fits]


# --------------------------------------------------------------------------- measured rows


def bundled() -> tuple[str, list[dict[str, Any]]]:
    """The table fedtune ships, measured on the demo task: ``(what was measured, rows)``."""
    data = json.loads(resources.files("fedtune").joinpath("resources/advise_demo.json").read_text())
    return data["task"], data["rows"]


def from_comparison(folder: Path) -> list[dict[str, Any]]:
    """A `fedtune compare` folder's rows, per client-round (bytes) as the advisor reads them."""
    path = Path(folder) / "comparison.json"
    if not path.is_file():
        raise ValueError(f"--from {folder}: no comparison.json there; give a folder written by fedtune compare "
                         "(or fedtune report with several runs).")
    out = []
    for r in json.loads(path.read_text()):
        summary_file = Path(folder) / r["run"] / "summary.json"
        s = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        n = s.get("client_rounds") or r.get("client_rounds")
        cpr = s.get("clients_per_round") or 1
        mem = r.get("client_peak_memory_bytes") or r.get("client_peak_memory_first_bytes")
        eps = r.get("epsilon", s.get("epsilon", (s.get("paradigm_metrics") or {}).get("epsilon")))
        gflops = r.get("client_gflops_per_round")
        out.append({
            "run": r["run"], "paradigm": r["paradigm"], "access": r.get("access"), "backprop": r.get("backprop"),
            "accuracy": r.get("accuracy"), "base_accuracy": r.get("base_accuracy"),
            "up_bytes_per_client_round": r["bytes_up"] / n if n else None,
            "down_bytes_per_client_round": r["bytes_down"] / n if n else None,
            "client_memory_bytes": mem, "memory_note": "peak of a client's process" if mem is not None else None,
            "client_gflops_per_client_round": None if gflops is None else gflops / cpr,
            "epsilon": eps, "source": str(folder),
        })
    return out


def report_lines(fit: list[Verdict], excluded: list[Verdict], c: Constraints, source: str) -> list[str]:
    """The answer as Markdown: the ranking with reasons, then what does not fit and why."""
    lines = [f"# fedtune advise", "", f"Measured on: {source}.", "",
             "Constraints: " + ", ".join([
                 f"client memory {human(c.client_memory, True)}" if c.client_memory else "client memory: any",
                 f"uplink {human(c.uplink)} per client-round" if c.uplink else "uplink: any",
                 f"access up to {c.access}-box",
                 "server reachable at every step" if c.server_every_step else "server only between rounds",
                 f"privacy budget epsilon {c.epsilon:g}" if c.epsilon else "no privacy budget"]) + ".", ""]
    if fit:
        lines += ["| rank | run | access | accuracy (base) | up per client-round | client memory | client GFLOPs per client-round |",
                  "|---|---|---|---|---|---|---|"]
        for i, v in enumerate(fit, 1):
            r = v.row
            acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
            base = "" if r.get("base_accuracy") is None else f" ({r['base_accuracy']:.3f})"
            g = r.get("client_gflops_per_client_round")
            lines.append(f"| {i} | {r['run']} | {r.get('access') or '-'} | {acc}{base} | "
                         f"{human(r.get('up_bytes_per_client_round'))} | {human(r.get('client_memory_bytes'), True)} | "
                         f"{'-' if g is None else f'{g:.0f}'} |")
        lines.append("")
        for i, v in enumerate(fit, 1):
            gain = "" if v.gain is None else f"{v.gain:+.3f} over the base model; "
            lines.append(f"{i}. **{v.row['run']}**: {gain}" + "; ".join(v.reasons) + f" [{v.row.get('source', source)}].")
    else:
        lines.append("No measured framework fits these constraints.")
    if excluded:
        lines += ["", "Does not fit:", ""]
        lines += [f"- **{v.row['run']}**: " + "; ".join(v.fails) + f" [{v.row.get('source', source)}]." for v in excluded]
    lines += ["", "Rank: accuracy gain over the base model, then accuracy, then fewer bytes up. Numbers from "
              "different tables were measured on different test sets: compare gains, and measure your own task with "
              "`fedtune compare` (then `fedtune advise --from FOLDER`).", ""]
    return lines
