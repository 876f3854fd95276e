"""One experiment from config to run folder: `run(config) -> summary`.

This file wires the layers together (data -> model -> paradigm over a runtime
-> metrics -> run folder); the algorithms themselves live in `paradigms/`.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .version import __version__
from . import checkpoint
from . import config as cfg
from . import attacks, paradigms, registry
from . import tracking
from .data.demo import DEMO_LABELS, DEMO_PROMPT, make_demo_task
from .data.demo_replies import make_reply_task
from .data.partition import label_histogram, partition_indices, skew
from .data.sources import load_records, require_fields
from .data.tasks import ClassificationTask, Example, GenerationTask
from .context import RunContext
from .evaluate import evaluate
from .grid import Grid
from .models import attach_lora, load_base, resolve_device
from .progress import Bars
from .report import write_outputs
from .html_report import run_page, write_partition
from .runtime.local import BatchedLocalGrid, LocalGrid
from . import safety, safety_eval
from .runtime.model_client import RemoteModelService
from .runtime.split_client import RemoteServices
from .model_service import LocalModelService
from .split_session import LocalServices


# --------------------------------------------------------------------------- data


@dataclass
class Prepared:
    """Tokenized data ready for a paradigm."""

    task: Any
    train: list[Example]
    test: list[Example]  # what the run scores: the test set, or the validation set with eval.split: validation
    parts: list[list[int]]
    keys: list[str]  # the value each train example was partitioned on
    extras: dict[str, list[Example]] = field(default_factory=dict)
    """What a paradigm holds back from every client (`Paradigm.held_data`), e.g. KD's public prompts."""
    eval_split: str = "test"  # which held-out data `test` holds: "test" or "validation"

    @property
    def public(self) -> list[Example]:
        """KD's public prompts (``extras["public"]``), known to the server and every client."""
        return self.extras.get("public", [])


def _load(d: cfg.DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    if d.source == "demo":
        return make_demo_task(seed=seed, n_train=d.demo_train_size, n_test=d.demo_test_size)
    if d.source == "demo-replies":
        return make_reply_task(seed=seed, n_train=d.demo_train_size, n_test=d.demo_test_size)
    records = load_records(d.source, split=d.split)
    if d.test_source:
        default_split = "test" if d.test_source.startswith("hf:") else None
        test = load_records(d.test_source, split=d.test_split or default_split)
        return records, test
    # Hold out a seeded random fraction: the same seed always gives the same test set.
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = max(1, int(round(len(records) * d.test_fraction)))
    if n_test >= len(records):
        raise ValueError(f"data.source {d.source!r} has only {len(records)} rows: too few to hold out a test set.")
    test_idx = set(order[:n_test])
    return [r for i, r in enumerate(records) if i not in test_idx], [records[i] for i in sorted(test_idx)]


def split_validation(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded ``fraction`` of the training rows as a validation set: ``(the other rows, validation rows)``.

    Its own random stream (``seed + 2``; the test hold-out uses ``seed``, KD's public set ``seed + 1``), so the
    same seed always carves the same rows, and both keep their order.
    """
    order = list(range(len(rows)))
    random.Random(seed + 2).shuffle(order)
    n = max(1, int(round(len(rows) * fraction)))
    if n >= len(rows):
        raise ValueError(f"data.validation_fraction = {fraction}: only {len(rows)} training rows, too few to "
                         "carve a validation set from; raise the training data or lower the fraction.")
    held = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def build_task(d: cfg.DataConfig, tokenizer):
    """The task object (prompt formatting, targets, scoring) that `d` describes."""
    common = dict(system_prompt=d.system_prompt, use_chat_template=d.use_chat_template, max_length=d.max_length)
    if d.task == "classification":
        if d.source == "demo" and not d.label_words:
            words, label_map = list(DEMO_LABELS), None
        elif isinstance(d.label_words, dict):
            words, label_map = list(dict.fromkeys(d.label_words.values())), dict(d.label_words)
        else:
            words, label_map = list(d.label_words or []), None
        prompt = d.prompt or (DEMO_PROMPT if d.source == "demo" else "{" + d.text_field + "}")
        return ClassificationTask(tokenizer, prompt, words, label_map, **common)
    prompt = d.prompt or "{" + d.text_field + "}"
    return GenerationTask(tokenizer, prompt, d.metric or "rouge_l", d.max_new_tokens, **common)


def prepare_data(c: cfg.Config, tokenizer, bars: Bars) -> Prepared:
    d = c.data
    train_rows, test_rows = _load(d, c.seed)
    if d.max_train_examples:
        train_rows = train_rows[: d.max_train_examples]
    if d.max_test_examples:
        test_rows = test_rows[: d.max_test_examples]
    test_source = d.test_source or d.source
    if c.eval.split == "validation":
        # Carved before partitioning, so no client trains on it; the test rows are dropped here and never scored.
        train_rows, test_rows = split_validation(train_rows, d.validation_fraction, c.seed)
        test_source = f"{d.source} (validation)"
    task = build_task(d, tokenizer)
    target_field = d.label_field if d.task == "classification" else d.response_field
    needed = sorted(set(task.fields) | {target_field})
    key_field = d.partition_field or (d.label_field if d.task == "classification" else None)
    if d.partition in ("dirichlet", "by_field"):
        if key_field is None:
            raise ValueError(f"data.partition = {d.partition!r} needs data.partition_field for a generation task.")
        needed = sorted(set(needed) | {key_field})
    require_fields(train_rows, needed, d.source)
    require_fields(test_rows, needed, test_source)

    def encode(rows: list[dict], source: str) -> list[Example]:
        return [task.encode(r, target_field, where=f"{source} row {i + 1}") for i, r in enumerate(rows)]

    train = encode(train_rows, d.source)
    test = encode(test_rows, test_source)
    keys = [str(r[key_field]) for r in train_rows] if key_field else ["-"] * len(train_rows)
    spec = paradigms.get(c.federation.paradigm)
    num_clients = 1 if spec.single_client else c.federation.num_clients
    parts = partition_indices(
        d.partition if num_clients > 1 else "iid",
        num_clients,
        c.seed,
        keys=keys if d.partition in ("dirichlet", "by_field") else None,
        n=len(train),
        alpha=d.alpha,
    )
    extras: dict[str, list[Example]] = {}
    if spec.held_data is not None:
        held, extras = spec.held_data(c, task, train_rows, train)
        # Held back after partitioning, so these clients keep the partition the other frameworks get.
        parts = [[i for i in part if i not in held] for part in parts]
    # Safety features: every example keeps its plain text; harmful pairs join each client (fedtune.safety).
    train, parts, keys = safety.with_text(c, task, train_rows, train, parts, keys)
    train, poisoned = attacks.poison(c, task, train_rows, train, parts, test_rows, target_field)  # simulated attacks only
    extras.update(poisoned)
    if num_clients > 1:
        bars.print(label_histogram(parts, keys))
        bars.print(f"partition {d.partition}: {sum(map(len, parts))} train examples over {num_clients} clients, "
                   f"skew {skew(parts, keys):.3f} (0 = IID); {len(test)} {c.eval.split} examples")
    return Prepared(task, train, test, parts, keys, extras, c.eval.split)


# --------------------------------------------------------------------------- run folder


def git_commit(package_dir: Path | None = None) -> str | None:
    """fedtune's own git commit, or None when this package is not a checkout of the fedtune repository.

    Only when `package_dir` (default: this package's folder) is ``src/fedtune`` of a git work tree whose
    top level holds a pyproject.toml naming the project "fedtune" (an editable install or a run from the
    checkout). An installed wheel inside some other repository, or inside a fedtune checkout's .venv,
    gets None rather than that repository's commit.
    """
    import tomllib  # here, not at the top: only this function needs it

    here = (package_dir or Path(__file__).parent).resolve()
    try:
        def git(*args: str) -> str:
            out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)
            return out.stdout.strip() if out.returncode == 0 else ""

        top = git("rev-parse", "--show-toplevel")
        if not top or here != (Path(top) / "src" / "fedtune").resolve():
            return None
        project = tomllib.loads((Path(top) / "pyproject.toml").read_text()).get("project", {})
        if project.get("name") != "fedtune":
            return None
        return git("rev-parse", "HEAD") or None
    except (OSError, subprocess.SubprocessError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None


class RunFolder:
    """The run's files; metrics are flushed as they happen, so a crash loses no finished round.

    ``resume``: keep the metrics already there (a checkpointed run continues them); otherwise the run
    starts a fresh ``metrics.jsonl``.
    """

    def __init__(self, path: Path, resume: bool = False) -> None:
        self.path = check_out(path)
        path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(path / "metrics.jsonl", "a" if resume else "w", buffering=1)

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")

    def base_accuracy(self) -> float | None:
        """The base model's accuracy already in ``metrics.jsonl`` (a resumed run's), or None."""
        with open(self.path / "metrics.jsonl") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("type") == "eval" and record.get("model") == "base":
                    return record.get("accuracy")
        return None

    def close(self) -> None:
        self._metrics.close()


def check_out(path: str | Path, flag: str = "--out") -> Path:
    """The run folder `path`, refused with a clear message when a file (not a folder) is in its place."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"{flag} {str(path)!r}: {str(p)!r} is a file, not a folder; give a folder for the run "
                             "(it is created when missing).")
    return path


def default_out(name: str) -> Path:
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


# --------------------------------------------------------------------------- run


GridFactory = Callable[[RunContext, paradigms.Paradigm], Grid]
"""Makes the grid a run's server talks through, from the context and the paradigm."""


def local_grid(ctx: RunContext, paradigm: paradigms.Paradigm) -> Grid:
    """The default runtime: every client app of the paradigm in this process.

    With ``runtime.batch_clients`` K > 1, clients train K at a time in one pass (the paradigm's ``batched``).
    """
    apps = registry.wrap_clients(ctx.config, paradigm.make_clients(ctx))
    k = ctx.config.runtime.batch_clients
    if k > 1:
        return BatchedLocalGrid(apps, paradigm.batched(apps), k, serialize=ctx.config.federation.serialize)
    return LocalGrid(apps, serialize=ctx.config.federation.serialize)


def services_for(c: cfg.Config, model, device: torch.device):
    """What a paradigm gets besides its Grid: split learning's main server, in process or the service at
    ``runtime.split_server`` (credentials from the environment, `fedtune.runtime.split_client`); and, as
    ``model_service``, the inference-only model service, in process or at ``runtime.model_server``."""
    if c.runtime.split_server:
        services = RemoteServices(c.runtime.split_server, model)
    else:
        services = LocalServices(model, device, serialize=c.federation.serialize)
    services.model_service = (RemoteModelService(c.runtime.model_server) if c.runtime.model_server
                              else LocalModelService(model, device, count_flops=c.train.count_flops))
    return services


def context(c: cfg.Config, model, tokenizer, data: Prepared, device: torch.device, bars: Bars, *,
            log: Callable[[dict[str, Any]], None], score: Callable[[], float], path: Path) -> RunContext:
    """The `RunContext` of a run (also what a Flower node or a worker rank builds for its clients)."""
    return RunContext(config=c, model=model, tokenizer=tokenizer, data=data, device=device, bars=bars, log=log,
                      score=score, path=path, services=services_for(c, model, device))


def load(config: cfg.Config | dict | str | Path) -> cfg.Config:
    """A `Config` from a `Config`, a plain dict of sections, or the path of a YAML file."""
    if isinstance(config, (str, Path)):
        return cfg.load(config)
    if isinstance(config, dict):
        return cfg.from_dict(config)
    return config


def load_model(c: cfg.Config) -> tuple[Any, Any, torch.device]:
    """Seed, load the base and attach a fresh LoRA, as `setup` does: ``(model, tokenizer, device)`` (no data)."""
    device = resolve_device(c.model.device)
    random.seed(c.seed)
    torch.manual_seed(c.seed)
    base, tokenizer = load_base(c.model.name, dtype=c.model.dtype, device=device,
                                attn_implementation=c.model.attn_implementation, quantization=c.model.quantization)
    return attach_lora(base, c.peft, c.seed), tokenizer, device


def setup(c: cfg.Config, bars: Bars, prepare: Callable[[cfg.Config, Any, Bars], Prepared] | None = None
          ) -> tuple[Any, Any, Prepared, torch.device]:
    """Seed, load the base, prepare the data and attach a fresh LoRA: ``(model, tokenizer, data, device)``.

    Every process of a multi-process run calls this with the same config, so all hold the same model and data.
    ``prepare`` replaces `prepare_data` (a deployed client reads its own file). The caller unloads the model
    (``model.unload()``) when done, leaving the cached base clean.
    """
    model, tokenizer, device = load_model(c)
    try:
        return model, tokenizer, (prepare or prepare_data)(c, tokenizer, bars), device
    except BaseException:
        model.unload()
        raise


def run(config: cfg.Config | dict | str | Path, out: str | Path | None = None, quiet: bool = False, *,
        grid_factory: GridFactory = local_grid) -> dict[str, Any]:
    """Run one experiment and return its summary (the same dict written to ``summary.json``).

    Args:
        config: A `Config`, a plain dict of sections, or the path of a YAML file.
        out: The run folder (default ``runs/<name>-<timestamp>``).
        quiet: No progress bars or tables.
        grid_factory: The runtime: makes the grid the server talks through (default: `local_grid`). Several
            processes (``runtime.world_size > 1``) start through `fedtune.launch.run`, whose rank 0 calls this.
    """
    c = load(config)
    if out is not None:
        check_out(out)  # before the model is loaded
    started = time.perf_counter()
    bars = Bars(quiet=quiet)
    model, tokenizer, data, device = setup(c, bars)
    try:
        return _run_federation(c, model, tokenizer, data, device, bars, Path(out) if out else default_out(c.name),
                               started, grid_factory)
    finally:
        # Leave the cached base as we found it, so another run in this process starts clean.
        model.unload()


def _run_federation(c, model, tokenizer, data: Prepared, device, bars: Bars, path: Path, started: float,
                    grid_factory: GridFactory = local_grid):
    resume = checkpoint.resumes(path, c)
    if not resume:
        # A fresh start overwrites the metrics: a checkpoint left by an earlier run in this folder (one that
        # checkpointed where this one does not) would otherwise be resumed by a later run, against them.
        for name in (checkpoint.FILE, checkpoint.PREVIOUS):
            if (path / name).is_file():
                (path / name).unlink()
    folder = RunFolder(path, resume=resume)
    resolved = cfg.to_yaml(c) + f"# fedtune {__version__}, git commit {git_commit()}\n"
    (path / "config.resolved.yaml").write_text(resolved)
    write_partition(path, data.parts, data.keys)  # report.html's per-client label histograms

    def score() -> float:
        return evaluate(model, data.task, data.test[: c.eval.max_examples], batch_size=c.eval.batch_size,
                        device=device, pad_id=tokenizer.pad_token_id)

    tracker = tracking.start(c, path)  # tracking.backend: the records go to TensorBoard/MLflow/W&B too
    log = tracker.wrap(safety_eval.wrap_log(c, model, tokenizer, device, path, folder.log))  # + AdvBench harmless rate
    ctx = context(c, model, tokenizer, data, device, bars, log=log, score=score, path=path)
    # A resumed run keeps the base evaluation it logged before round 1: a resume that then fails (an unreadable
    # checkpoint) must not leave another round-0 record each time it is tried.
    base_accuracy = folder.base_accuracy() if resume and c.eval.base else None
    if c.eval.base and base_accuracy is None:
        with model.disable_adapter():
            base_accuracy = score()
        log({"type": "eval", "round": 0, "accuracy": base_accuracy, "model": "base"})
        bars.print(f"base model: accuracy {base_accuracy:.4f}")

    attacks.announce(ctx)
    paradigm = paradigms.get(c.federation.paradigm)
    # The only place a runtime meets a paradigm: the paradigm makes client apps and a server loop,
    # the runtime carries the messages between them.
    try:
        grid = grid_factory(ctx, paradigm)
        with bars.live():
            evaluations = paradigm.run_server(ctx, grid)
    except BaseException:
        tracker.close(failed=True)
        raise
    finally:
        ctx.close()
        folder.close()
    summary = write_outputs(path, c, base_accuracy, evaluations, time.perf_counter() - started, bars)
    summary = safety_eval.add_to_summary(path, summary)
    run_page(path)  # report.html beside report.md
    tracker.finish(summary)
    return summary
