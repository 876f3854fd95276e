"""Responsible FedLLM, the data side: the ``safety`` config section, HH-RLHF's disjoint splits, and the
harmful client data of "Toward Responsible Federated Large Language Models" (arXiv 2502.16691).

The paper's threat: some of every client's training dialogues are harmful (about 30%), and FedAvg spreads
the unsafe model to everyone. `mix_harmful` reproduces it: each client's part gets exactly
``round(f * n / (1 - f))`` harmful (prompt, response) pairs on top of its n benign examples, so that the
harmful share is ``safety.harmful_fraction`` f. The pairs come from Anthropic's HH-RLHF harmless-base
dialogues (`hh_splits`): the ``rejected`` final replies are mostly compliance with a harmful request, the
``chosen`` ones safer. One fixed seed splits the dialogues into disjoint parts: the clients' harmful data,
the safety filter's training and validation data, and the server's red-team prompts for constitutional
AI. None of them is ever scored: the harmless rate is measured on AdvBench (`fedtune.safety_eval`).

Every training example of a run with a ``safety`` feature on is a `Pair`: the tokenized example plus the
plain (prompt, response) text a safety filter reads, and whether it came from the harmful split (for the
report only: a filter never sees that flag).
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .data.tasks import Example
from . import registry
from .registry import Option, register_option


@dataclass
class SafetyConfig:
    eval: bool = False
    """Score the AdvBench harmless rate (refusal-phrase judge, `fedtune.safety_eval`) beside the benign metric at every evaluation, base model included."""
    advbench: str = "../shared/data/advbench/harmful_behaviors.csv"
    """AdvBench's harmful_behaviors.csv (520 `goal` rows), read when `eval` is on."""
    eval_examples: int = 100
    """How many AdvBench behaviours are answered (evenly spaced over the 520; 520 = all)."""
    eval_max_new_tokens: int = 32
    """Greedy answer length judged (GCG's check uses 32 new tokens)."""
    harmful_source: str | None = None
    """HH-RLHF harmless-base dialogues (.jsonl or .jsonl.gz with `chosen`/`rejected`); the clients' harmful pairs are (last human turn, `rejected` reply) of its client split."""
    harmful_fraction: float = 0.0
    """Share of harmful pairs in every client's training data (0.3 in the paper); needs `harmful_source` and a generation task."""
    split_seed: int = 0
    """Seed of the fixed split of `harmful_source` into client / filter / red-team parts (`fedtune.safety.hh_splits`)."""
    filter: str = "none"
    """Clients screen their (prompt, response) pairs before training: `none`, `trained` (a classifier fedtune trains on the filter split: the base model + LoRA answering ` safe` / ` unsafe`, saved in PEFT format under <run>/safety_filter and shipped to clients as an adapter), or a Hugging Face classifier / guard model id or local path."""
    filter_action: Literal["drop", "refuse"] = "drop"
    """What a client does with a pair judged unsafe: `drop` it, or `refuse` (keep the prompt, train on a refusal instead: FedDetox)."""
    filter_adapter: str | None = None
    """A fedtune filter adapter saved by an earlier run (<run>/safety_filter) to ship instead of training a new one (`filter: trained`)."""
    filter_cache: bool = True
    """Keep a trained filter under the model cache ($FEDTUNE_CACHE/safety-filter/<key>) and reuse it in later runs with the same model, LoRA shape, filter data and settings (its validation figures come with it)."""
    filter_steps: int = 60
    """Optimizer steps of fedtune's own filter classifier."""
    filter_lr: float = 1e-3
    filter_batch_size: int = 8
    cai: bool = False
    """Constitutional AI on the server after every aggregation: the global model answers red-team prompts, a reviser critiques and revises each answer under the constitution (`fedtune.cai`), and the global adapter trains a few steps on the revisions."""
    cai_reviser: str = "templates"
    """Who critiques and revises: `templates` (refusal templates, no model) or a Hugging Face causal LM id / local path (its chat template is used)."""
    cai_prompts: int = 16
    """Red-team prompts answered per round (drawn in turn from the red-team split)."""
    cai_steps: int = 8
    """Optimizer steps on the revisions per round."""
    cai_lr: float = 3e-4
    cai_batch_size: int = 4
    cai_dpo: bool = False
    """Train with DPO (the revision preferred over the first answer, the aggregated adapter as the reference) instead of SFT on the revisions."""
    cai_beta: float = 0.1
    """DPO's beta for `cai_dpo`."""
    cai_max_new_tokens: int = 48
    """Length of the global model's first answers (and of a reviser model's critiques and revisions)."""


SPLIT_FRACTIONS = {"client": 0.5, "filter": 0.25, "redteam": 0.25}
"""How `hh_splits` divides the dialogues (the filter part is 80% training, 20% validation)."""
FILTER_VALIDATION = 0.2


def validate(c) -> None:
    """Cross-section checks of the ``safety`` section (a ValueError naming the field)."""
    s = c.safety
    if not 0 <= s.harmful_fraction < 1:
        raise ValueError(f"safety.harmful_fraction = {s.harmful_fraction!r} is not allowed: a share in [0, 1) "
                         "(0.3 in the paper).")
    if s.harmful_fraction > 0 and not s.harmful_source:
        raise ValueError("safety.harmful_fraction = {} needs safety.harmful_source: the HH-RLHF file, e.g. "
                         "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz.".format(s.harmful_fraction))
    if s.harmful_fraction > 0 and c.data.task != "generation":
        raise ValueError(f"safety.harmful_fraction = {s.harmful_fraction} needs data.task: generation (a harmful "
                         f"reply is text, not a label), got {c.data.task!r}.")
    for name in ("eval_examples", "eval_max_new_tokens", "filter_steps", "filter_batch_size", "cai_prompts",
                 "cai_steps", "cai_batch_size", "cai_max_new_tokens"):
        if getattr(s, name) < 1:
            raise ValueError(f"safety.{name} = {getattr(s, name)!r} is not allowed: a positive integer.")
    for name in ("filter_lr", "cai_lr", "cai_beta"):
        if not getattr(s, name) > 0:
            raise ValueError(f"safety.{name} = {getattr(s, name)!r} is not allowed: a positive number.")
    needs_hh = [n for n, on in (("filter: trained", s.filter == "trained" and not s.filter_adapter),
                                ("cai: true", s.cai)) if on]
    if needs_hh and not s.harmful_source:
        raise ValueError(f"safety.{needs_hh[0].split(':')[0]} = {needs_hh[0].split(': ')[1]} needs "
                         "safety.harmful_source (its filter / red-team split).")
    paradigm = c.federation.paradigm
    spec = registry.get(paradigm)
    # A paradigm says what it supports by marking its functions (`SCREENS_PAIRS`, `RUNS_CAI`), so nothing here
    # names one.
    screening = getattr(spec.make_clients, SCREENS_PAIRS, False)
    if s.filter != "none" and not screening:
        raise ValueError(f"safety.filter = {s.filter!r}: federation.paradigm {paradigm!r} has no client screening "
                         f"(paradigms that screen: {', '.join(_marked('make_clients', SCREENS_PAIRS))}); set "
                         "safety.filter: none.")
    if s.harmful_fraction > 0 and not screening:
        raise ValueError(f"safety.harmful_fraction = {s.harmful_fraction}: harmful pairs are mixed into the data of "
                         f"federation.paradigm {', '.join(_marked('make_clients', SCREENS_PAIRS))}, not {paradigm!r}.")
    if s.cai and not getattr(spec.run_server, RUNS_CAI, False):
        raise ValueError(f"safety.cai = true: the server's CAI step trains the global LoRA of federation.paradigm "
                         f"{', '.join(_marked('run_server', RUNS_CAI))}, not {paradigm!r}; set safety.cai: false.")


SCREENS_PAIRS = "screens_pairs"
"""The attribute a paradigm sets on its ``make_clients`` when its clients train on `Pair` examples
(``safety.filter`` and ``safety.harmful_fraction`` apply)."""
RUNS_CAI = "runs_cai"
"""The attribute a paradigm sets on its ``run_server`` when its round loop runs the CAI step (`fedtune.cai`)."""


def _marked(fn: str, attr: str) -> list[str]:
    return [n for n in registry.names() if getattr(getattr(registry.get(n), fn), attr, False)]


register_option(Option("safety", SafetyConfig, validate))


def active(c) -> bool:
    """Whether any safety feature that needs the (prompt, response) text of the training examples is on."""
    return c.safety.harmful_fraction > 0 or c.safety.filter != "none"


# --------------------------------------------------------------------------- HH-RLHF


@dataclass(frozen=True)
class Dialogue:
    """One HH-RLHF dialogue as a single-turn pair: the last human turn and the two final replies."""

    index: int
    prompt: str
    chosen: str
    rejected: str


def last_exchange(transcript: str) -> tuple[str, str]:
    """``(last human turn, final assistant reply)`` of a "\\n\\nHuman: ... \\n\\nAssistant: ..." transcript."""
    head, sep, reply = transcript.rpartition("\n\nAssistant:")
    if not sep:
        raise ValueError("an HH-RLHF transcript without an '\\n\\nAssistant:' turn")
    _, sep, prompt = head.rpartition("\n\nHuman:")
    if not sep:
        raise ValueError("an HH-RLHF transcript without a '\\n\\nHuman:' turn")
    return prompt.strip(), reply.strip()


def load_dialogues(path: str | Path) -> list[Dialogue]:
    """The dialogues of an HH-RLHF file (.jsonl or .jsonl.gz, fields `chosen` and `rejected`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"safety.harmful_source = {str(path)!r} is not a file: give the HH-RLHF harmless-base "
                         "file, e.g. ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz.")
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            row = json.loads(line)
            prompt, chosen = last_exchange(row["chosen"])
            prompt_r, rejected = last_exchange(row["rejected"])
            if prompt and chosen and rejected and prompt == prompt_r:
                out.append(Dialogue(i, prompt, chosen, rejected))
    return out


_SPLITS: dict[tuple[str, int], dict[str, list[Dialogue]]] = {}


def hh_splits(path: str | Path, seed: int) -> dict[str, list[Dialogue]]:
    """The dialogues of `path` split by `seed` into disjoint ``client``, ``filter_train``, ``filter_val`` and
    ``redteam`` parts (`SPLIT_FRACTIONS`); the same file and seed always give the same parts."""
    key = (str(Path(path).resolve()), seed)
    if key not in _SPLITS:
        rows = load_dialogues(path)
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_client = int(len(rows) * SPLIT_FRACTIONS["client"])
        n_filter = int(len(rows) * SPLIT_FRACTIONS["filter"])
        n_val = int(n_filter * FILTER_VALIDATION)
        cut = [0, n_client, n_client + n_filter - n_val, n_client + n_filter, len(rows)]
        names = ("client", "filter_train", "filter_val", "redteam")
        _SPLITS[key] = {name: [rows[j] for j in order[a:b]] for name, a, b in zip(names, cut, cut[1:])}
    return _SPLITS[key]


# --------------------------------------------------------------------------- client data


@dataclass
class Pair(Example):
    """A training example with the plain text a safety filter reads.

    ``harmful`` says whether it came from the harmful split: the run's report counts what a filter dropped
    of each kind, but no filter ever reads it.
    """

    prompt_text: str = ""
    response_text: str = ""
    harmful: bool = False


def harmful_count(n_benign: int, fraction: float) -> int:
    """How many harmful pairs join `n_benign` examples so that they are `fraction` of the whole."""
    return int(round(fraction * n_benign / (1 - fraction))) if fraction > 0 else 0


def encode_pair(task, prompt: str, response: str, target_field: str) -> Example:
    """`prompt` and `response` through the task's own template: the prompt fills its first field."""
    record: dict[str, Any] = {f: "" for f in task.fields}
    if task.fields:
        record[task.fields[0]] = prompt
    record[target_field] = response
    return task.encode(record, target_field, where="harmful pair")


def with_text(c, task, train_rows: list[dict], train: list[Example], parts: list[list[int]], keys: list[str]
              ) -> tuple[list[Example], list[list[int]], list[str]]:
    """The training data of a run with safety features: every example a `Pair`, and, with
    ``safety.harmful_fraction`` f > 0, each client's part extended by ``harmful_count(n, f)`` harmful pairs
    (disjoint across clients, from the client split of ``safety.harmful_source`` only).

    Returns ``(train, parts, keys)`` (unchanged when no safety feature is on).
    """
    if not active(c):
        return train, parts, keys
    s = c.safety
    target_field = c.data.label_field if c.data.task == "classification" else c.data.response_field
    out: list[Example] = []
    for row, e in zip(train_rows, train):
        prompt = task.prompt.format_map({k: str(v) for k, v in row.items()})
        out.append(Pair(e.prompt_ids, e.target_ids, e.label, e.reference, prompt, str(row[target_field])))
    parts = [list(p) for p in parts]
    keys = list(keys)
    if s.harmful_fraction > 0:
        pool = hh_splits(s.harmful_source, s.split_seed)["client"]
        need = [harmful_count(len(p), s.harmful_fraction) for p in parts]
        if sum(need) > len(pool):
            raise ValueError(f"safety.harmful_fraction = {s.harmful_fraction}: the clients need {sum(need)} harmful "
                             f"pairs, the client split of {s.harmful_source} has {len(pool)}; lower the fraction or "
                             "the training data (data.max_train_examples).")
        taken = 0
        for part, k in zip(parts, need):
            for d in pool[taken:taken + k]:
                e = encode_pair(task, d.prompt, d.rejected, target_field)
                part.append(len(out))
                out.append(Pair(e.prompt_ids, e.target_ids, None, e.reference, d.prompt, d.rejected, harmful=True))
                keys.append("harmful")
            taken += k
    return out, parts, keys
