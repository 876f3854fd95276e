"""`fedtune compare`: the same model, data, partition, seed and round budget under each framework.

Every run is an ordinary run folder under the comparison folder; the comparison
itself is `comparison.json` (one row per run), `comparison.md` and three plots.

A framework may get its own settings: fixed ones (``compare.lr`` in the YAML, ``--set-for``) or a tuned
one (``--tune key=v1,v2``): one tuning run per candidate, scored on a validation split carved from the
training rows (``eval.split: validation``), then the final run at the best candidate, scored on the test set.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table  # noqa: E402

from . import config as cfg  # noqa: E402
from . import attacks, privacy, registry  # noqa: E402
from .progress import console  # noqa: E402
from .report import MB, NOT_COUNTED, read_metrics, write_summary  # noqa: E402
from .safety_eval import COLUMNS as SAFETY_COLUMNS, ROW_KEYS, base_key  # noqa: E402
from .html_report import comparison_page, run_page  # noqa: E402
from .comparison_plots import curves, plots  # noqa: E402,F401  (curves: one run's accuracy/MB per round)

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


def parse_tune(item: str) -> tuple[str, list[tuple[str, float | int]]]:
    """``key=v1,v2`` -> (key, [(text as typed, number)]): the candidates of a tuning, numbers only."""
    import yaml

    key, sep, values = item.partition("=")
    key = key.strip()
    texts = [v.strip() for v in values.split(",")]
    if not sep or not key or not all(texts):
        raise cfg.ConfigError(f"--tune {item!r} must look like section.key=v1,v2 (e.g. train.lr=1e-4,3e-4,1e-3).")
    out = []
    for text in texts:
        v = yaml.safe_load(text)
        if isinstance(v, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise cfg.ConfigError(f"--tune {item!r}: {text!r} is not a number; a tuning's candidates are numbers.")
        out.append((text, v))
    if len({v for _, v in out}) != len(out) or len(out) < 2:
        raise cfg.ConfigError(f"--tune {item!r} needs at least two different candidates "
                              "(to fix one framework's value, use --set-for PARADIGM:KEY=VALUE).")
    return key, out


def parse_set_for(items: list[str], paradigms: list[str]) -> dict[str, list[str]]:
    """``paradigm:section.key=value`` strings -> {paradigm: [section.key=value, ...]}, in the order given."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, setting = item.partition(":")
        name = name.strip()
        if not sep or not name or "=" not in setting:
            raise cfg.ConfigError(f"--set-for {item!r} must look like PARADIGM:section.key=value "
                                  "(e.g. kd:train.lr=1e-3).")
        if name not in paradigms:
            raise cfg.ConfigError(f"--set-for {item!r}: {name!r} is not among the compared frameworks "
                                  f"(--paradigms {','.join(paradigms)}).")
        cfg.parse_override(setting)  # the key=value itself is checked here, its value when the configs load
        out.setdefault(name, []).append(setting.strip())
    return out


def _key(setting: str) -> str:
    """The dotted key of a ``section.key=value`` setting."""
    return ".".join(cfg.parse_override(setting)[0])


def _value(c, key: str) -> Any:
    """The value of dotted `key` in config `c`, as loaded (typed: ``5e-4`` is a float)."""
    node = c.to_dict()
    for part in key.split("."):
        node = node[part]
    return node


@dataclass
class Candidate:
    """One value of a tuning: its tuning run and the final run it would give."""

    text: str  # as typed; names the tuning folder and the key in `tuning`
    value: float | int
    tuning: Any  # Config: validation split, tuning budget, only the last round scored
    final: Any  # Config: the run on the test set, had this value been chosen


@dataclass
class Planned:
    """One row of the comparison: a framework at one sweep point, with its own settings."""

    label: str
    swept: dict[str, Any]
    config: Any  # Config of the run (with a tuning: before the value is chosen, the untuned one)
    settings: dict[str, Any] = field(default_factory=dict)  # per-framework values (compare.lr, --set-for)
    candidates: list[Candidate] = field(default_factory=list)


def plan(config_path: str | None, overrides: list[str], paradigms: list[str], sweep: list[tuple[str, list[Any]]],
         *, set_for: dict[str, list[str]] | None = None, tune: tuple[str, list[tuple[str, Any]]] | None = None,
         tune_rounds: int | None = None) -> list[Planned]:
    """Every run of the comparison, tuning runs included, as validated configs: all are checked before any runs.

    A framework's settings, later ones winning: the YAML, its ``compare.lr`` entry as ``train.lr`` (dropped when
    ``--set``, ``--sweep`` or ``--tune`` sets train.lr), ``--set``, its ``--set-for`` settings, the sweep point,
    and the tuned value.
    """
    for p in paradigms:
        if p not in registry.names():
            raise cfg.ConfigError(f"--paradigms: {p!r} is not one of {', '.join(registry.names())}.")
    set_for = set_for or {}
    if tune_rounds is not None and tune is None:
        raise cfg.ConfigError("--tune-rounds needs --tune KEY=V1,V2: it is the budget of the tuning runs.")
    if tune_rounds is not None and tune_rounds < 1:
        raise cfg.ConfigError(f"--tune-rounds {tune_rounds} is not allowed: a positive number of rounds.")
    swept_keys = {k for k, _ in sweep}
    tune_key = tune[0] if tune else None
    if tune_key in swept_keys:
        raise cfg.ConfigError(f"--tune {tune_key} and --sweep {tune_key}: a key is either swept or tuned, not both.")
    for p, items in set_for.items():
        for key in map(_key, items):
            if key == "federation.paradigm":
                raise cfg.ConfigError(f"--set-for {p}:{key}=...: the framework is the one before the colon.")
            if key == tune_key or key in swept_keys:
                raise cfg.ConfigError(f"--set-for {p}:{key}=... and --{'tune' if key == tune_key else 'sweep'} "
                                      f"{key} both set {key} for {p}: drop one.")
    base = cfg.load(config_path, list(overrides))
    lr_elsewhere = "train.lr" in {_key(o) for o in overrides} | swept_keys | {tune_key}
    runs = []
    grids = [[(k, v) for v in vs] for k, vs in sweep]  # no sweep: product() yields one empty point
    for point in itertools.product(*grids):
        for p in paradigms:
            own = [f"train.lr={base.compare.lr[p]!r}"] if p in base.compare.lr and not lr_elsewhere else []
            sets = (own + list(overrides) + set_for.get(p, []) + [f"federation.paradigm={p}"]
                    + [f"{k}={json.dumps(v)}" for k, v in point])
            c = cfg.load(config_path, sets)
            label = "-".join([p] + [f"{k.split('.')[-1]}={v}" for k, v in point])
            settings = {k: _value(c, k) for k in map(_key, own + set_for.get(p, []))}
            planned = Planned(label, dict(point), c, settings)
            for text, value in (tune[1] if tune else []):
                final = cfg.load(config_path, sets + [f"{tune_key}={json.dumps(value)}"])
                rounds = tune_rounds or final.federation.rounds
                tuning = cfg.load(config_path, sets + [f"{tune_key}={json.dumps(value)}", "eval.split=validation",
                                                       f"federation.rounds={rounds}", f"eval.every={rounds}",
                                                       "eval.base=false"])
                planned.candidates.append(Candidate(text, value, tuning, final))
            runs.append(planned)
    return runs


def choose(scores: dict[str, float | None], values: dict[str, float | int]) -> str:
    """The candidate with the best validation score; ties go to the smaller value; a failed run (None or NaN)
    is never chosen. ValueError when every run failed."""
    ok = [t for t, a in scores.items() if a is not None and not math.isnan(a)]
    if not ok:
        raise ValueError(f"every tuning run failed or scored nothing ({', '.join(scores)}): no value to choose.")
    return max(ok, key=lambda t: (scores[t], -values[t]))


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
        "client_accuracy": s.get("client_accuracy"),
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
        **{k: s[k] for k in ("epsilon", "delta", "noise_multiplier", "backdoor_asr") if k in s},
        **({"attack": s["attack"]["kind"], "malicious": s["attack"]["malicious"]} if "attack" in s else {}),
        **{k: s[k] for k in ROW_KEYS if k in s},  # safety.eval, safety.filter, safety.cai (fedtune.safety_eval)
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
    ("client acc", "client_accuracy", "{:.3f}"),
    ("MB up", "bytes_up", "mb"),
    ("MB down", "bytes_down", "mb"),
    ("client GFLOPs/round", "client_gflops_per_round", "{:.1f}"),
    ("client peak MiB", "client_peak_memory_bytes", "mib"),
    ("1st-round peak MiB", "client_peak_memory_first_bytes", "mib"),
    ("server GFLOPs/round", "server_gflops_per_round", "{:.1f}"),
    ("wall s", "wall_time_s", "{:.0f}"),
    ("failed", "failed_client_rounds", "{}"),
]
FEATURE_COLUMNS = [("attack (simulated)", "attack", "{}"), ("epsilon", "epsilon", "{:.3g}"),  # only when a run has them
                   ("noise mult.", "noise_multiplier", "{:.3g}"), ("backdoor ASR", "backdoor_asr", "{:.3f}")]


def _cell(r: dict[str, Any], key: str, fmt: str) -> str:
    v = r.get(key)
    if fmt == "kv":
        return ", ".join(f"{k}={x:g}" if isinstance(x, float) else f"{k}={x}" for k, x in (v or {}).items()) or "-"
    if v is None:
        return NOT_COUNTED if key.endswith("gflops_per_round") else "-"
    if fmt == "mb":
        return f"{v / MB:.2f}"
    if fmt == "yesno":
        return "yes" if v else "no"
    if fmt == "mib":
        return f"{v / 2**20:.0f}"
    return fmt.format(v)


def _columns(rows: list[dict[str, Any]], swept: list[str]) -> list[tuple[str, str, str]]:
    """The table's columns: the run, the swept keys, per-framework and tuned settings (when any), the numbers."""
    own = [(name, key, "kv") for name, key in (("settings", "settings"), ("tuned", "tuned"))
           if any(r.get(key) for r in rows)]
    features = [c for c in FEATURE_COLUMNS if any(c[1] in r for r in rows)]
    safety = [c for c in SAFETY_COLUMNS if any(r.get(c[1]) is not None for r in rows)]
    return (COLUMNS[:1] + [(k, k, "{}") for k in swept] + own + COLUMNS[1:5] + safety + COLUMNS[5:6] + features
            + COLUMNS[6:])


def tuning_markdown(rows: list[dict[str, Any]], key: str, rounds: str) -> str:
    """The tuning table: each run's validation score per candidate of `key`, the chosen one in bold."""
    texts = list(dict.fromkeys(t for r in rows for t in r.get("tuning", {})))
    lines = [f"## Tuning `{key}`", "",
             f"Each framework ran once per candidate on a validation split carved from its training rows "
             f"(data.validation_fraction, held back from every client; {rounds}); the final run uses the "
             "candidate with the best final validation score (ties: the smaller value) and is scored on the "
             "test set.", "",
             "| run | " + " | ".join(texts) + " | chosen |", "|" + "---|" * (len(texts) + 2)]
    for r in rows:
        if not r.get("tuning"):
            continue
        cells = []
        for t in texts:
            a = r["tuning"].get(t)
            cell = "failed" if a is None or (isinstance(a, float) and math.isnan(a)) else f"{a:.3f}"
            cells.append(f"**{cell}**" if t == r["tuned_candidate"] else cell)
        lines.append(f"| {r['run']} | " + " | ".join(cells) + f" | {r['tuned_candidate']} |")
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], swept: list[str]) -> str:
    cols = _columns(rows, swept)
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r, k, f) for _, k, f in cols) + " |" for r in rows]
    return "\n".join(lines)


def rich_table(rows: list[dict[str, Any]], swept: list[str]) -> Table:
    cols = _columns(rows, swept)
    t = Table(title="fedtune compare")
    for name, _, _ in cols:
        t.add_column(name, justify="left" if name == "run" else "right")
    for r in rows:
        t.add_row(*[_cell(r, k, f) for _, k, f in cols])
    return t


def compare(
    config_path: str | None,
    *,
    overrides: list[str] | None = None,
    paradigms: list[str] | None = None,
    sweep: list[str] | None = None,
    set_for: list[str] | None = None,
    tune: str | None = None,
    tune_rounds: int | None = None,
    out: str | Path = "runs/compare",
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Run every framework (x every sweep point) and write the comparison; returns its rows.

    Args:
        set_for: ``PARADIGM:section.key=value`` settings for one framework's runs only.
        tune: ``section.key=v1,v2,...``: per framework, one tuning run per candidate on the validation split,
            then the final run at the best one (its row gets ``tuned`` and ``tuning``).
        tune_rounds: The tuning runs' federation.rounds (default: the final runs').
    """
    from .experiment import check_out
    from .launch import run

    sweep_keys = parse_sweep(sweep or [])
    names = list(paradigms or DEFAULT_PARADIGMS)
    tuning = parse_tune(tune) if tune else None
    runs = plan(config_path, overrides or [], names, sweep_keys, set_for=parse_set_for(set_for or [], names),
                tune=tuning, tune_rounds=tune_rounds)
    out = check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, done = [], []
    base_cache: dict[str, tuple[float, str, dict]] = {}  # -> (base accuracy, the run that scored it, base safety)
    for i, planned in enumerate(runs, 1):
        label, c = planned.label, planned.config
        scores: dict[str, float | None] = {}
        if planned.candidates:
            for j, cand in enumerate(planned.candidates, 1):
                if not quiet:
                    console.rule(f"[bold]{i}/{len(runs)}: {label}, tuning {j}/{len(planned.candidates)}: "
                                 f"{tuning[0]}={cand.text} (validation split)")
                scores[cand.text] = run(cand.tuning, out=out / "tuning" / f"{label}-{cand.text}",
                                        quiet=quiet)["accuracy"]
            chosen = choose(scores, {cand.text: cand.value for cand in planned.candidates})
            c = next(cand.final for cand in planned.candidates if cand.text == chosen)
            if not quiet:
                console.print(f"{label}: {tuning[0]}={chosen} (validation: "
                              + ", ".join(f"{t} {_score(a)}" for t, a in scores.items()) + ")")
        if not quiet:
            console.rule(f"[bold]{i}/{len(runs)}: {label}")
        # The base model's score depends only on the model and the data: measure it once per pair.
        key = json.dumps([c.to_dict()["model"], c.to_dict()["data"], c.seed, c.eval.max_examples, c.eval.split,
                          *base_key(c)], sort_keys=True)
        known = base_cache.get(key)
        if known is not None:
            c.eval.base = False
        summary = run(c, out=out / label, quiet=quiet)
        if known is not None:
            # The run did not score the base (eval.base was off): its summary.json and report.md get the
            # comparison's number, so the run's own report agrees with the comparison table.
            summary["base_accuracy"], summary["base_accuracy_from"] = known[:2]
            summary.update(known[2])
            write_summary(out / label, summary)
            run_page(out / label)
        elif summary["base_accuracy"] is not None:
            base_cache[key] = (summary["base_accuracy"], label,
                               {k: summary[k] for k in ("base_harmless_rate",) if summary.get(k) is not None})
        r = row(label, planned.swept, summary)
        if planned.settings:
            r["settings"] = planned.settings
        if planned.candidates:
            cand = next(cand for cand in planned.candidates if cand.text == chosen)
            r.update(tuned={tuning[0]: cand.value}, tuned_candidate=chosen, tuning=scores,
                     tuning_rounds=cand.tuning.federation.rounds)
        rows.append(r)
        done.append((label, out / label))
        # Written after every run, so an interrupted comparison keeps what finished.
        (out / "comparison.json").write_text(json.dumps(rows, indent=2))
    swept_names = [k for k, _ in sweep_keys]
    write_comparison(out, rows, done, swept_names, f"fedtune compare: `{config_path or 'defaults'}`",
                     tuning[0] if tuning else None)
    if not quiet:
        console.print(rich_table(rows, swept_names))
        console.print(f"comparison written to {out}/comparison.md and comparison.html")
    return rows


def write_comparison(out: Path, rows: list[dict[str, Any]], done: list[tuple[str, Path]], swept_names: list[str],
                     title: str, tuned_key: str | None = None) -> None:
    """comparison.md, comparison.html and plots/ of a comparison's rows and run folders (`done`: label, path)."""
    plots(out / "plots", done, rows)
    extra_plots = [f"![{name}](plots/{name}.png)" for name, drawn in (("accuracy_by_attack", attacks.plot(
        rows, swept_names, out / "plots")), ("accuracy_vs_epsilon", privacy.plot(rows, out / "plots"))) if drawn]
    md = [f"# {title}", "", markdown(rows, swept_names), "",
          "![accuracy per round](plots/accuracy_vs_round.png)",
          "![accuracy vs communication](plots/accuracy_vs_communication.png)",
          "![client compute vs accuracy](plots/compute_vs_accuracy.png)", *extra_plots, "",
          "MB are exact encoded bytes over the whole run; GFLOPs are counted on the real steps "
          "(client: all sampled clients of a round together; \"not counted\" with train.count_flops: false). "
          "Client peak MiB is the largest of the rounds after the first; the first round's includes one-time "
          "warm-up.", ""]
    if tuned_key:
        budgets = sorted({r["tuning_rounds"] for r in rows})
        md += [tuning_markdown(rows, tuned_key, f"{'/'.join(map(str, budgets))} round(s) each, "
                               "only the last one scored"), ""]
    md += ["Interactive plots, the frameworks side by side and per-client label histograms: `comparison.html`.", ""]
    (out / "comparison.md").write_text("\n".join(md))
    cols = _columns(rows, swept_names)
    comparison_page(out, rows, done, ([c[0] for c in cols], [[_cell(r, k, f) for _, k, f in cols] for r in rows]),
                    title.replace("`", ""))


def _score(a: float | None) -> str:
    return "failed" if a is None or math.isnan(a) else f"{a:.3f}"
