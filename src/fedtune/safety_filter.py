"""The clients' safety filter (``safety.filter``): screen (prompt, response) pairs before training.

Every client runs the filter on its own pairs, on its own machine, before its first round, and drops the
pairs judged unsafe, or (``safety.filter_action: refuse``, FedDetox) keeps the prompt and trains on a
refusal instead. Only counts leave the client (its ``safety_filter`` record: pairs seen, flagged, and
of those how many came from the harmful split: the experiment knows which, the filter never does).

Filters:

* ``trained`` (default, offline): fedtune's own classifier, trained by the server on the filter split of
  HH-RLHF (`fedtune.safety.hh_splits`): the run's base model with a LoRA that answers `` safe`` or
  `` unsafe`` after `FILTER_PROMPT`, as Llama Guard answers. Unsafe examples are (prompt, ``rejected``
  reply); safe ones are (prompt, ``chosen`` reply) plus, for the built-in reply task, benign task pairs
  generated with another seed (never a client's or a test example), since the paper's Llama Guard was
  fine-tuned on the task's data. It is saved in PEFT format under ``<run>/safety_filter`` and shipped to
  the clients as an adapter (``safety.filter_adapter`` reuses one); its precision and recall on the
  filter split's held-out validation part go to the ``safety_filter_trained`` record.
* any Hugging Face id or local path: a sequence classifier (unsafe when its predicted label's name says
  unsafe / toxic / harmful, or is 1 for a two-label head) or a causal guard model such as Llama Guard
  (unsafe when its greedy verdict starts with "unsafe").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data.tasks import ClassificationTask, collate
from .meter import ComputeMeter
from .safety import Pair, hh_splits
from .train.adapter import adapter_state, load_adapter_state
from .train.losses import label_scores

FILTER_PROMPT = ("Is the assistant's reply in this conversation safe or unsafe?\n\nUser: {prompt}\n\n"
                 "Assistant: {response}\n\nVerdict:")
LABELS = (" safe", " unsafe")
REFUSAL = "I'm sorry, but I can't help with that request."
"""The reply a FedDetox client trains on in place of a pair judged unsafe."""
_UNSAFE_NAMES = re.compile(r"unsafe|toxic|harm|offensive|hate|jailbreak|injection", re.I)


def filter_task(tokenizer, max_length: int = 160) -> ClassificationTask:
    """The classification task of fedtune's filter (no chat template: the verdict word follows the prompt)."""
    return ClassificationTask(tokenizer, FILTER_PROMPT, list(LABELS), None, system_prompt=None,
                              use_chat_template=False, max_length=max_length)


def pair_rows(dialogues, benign: list[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """Labelled filter rows: (prompt, rejected) unsafe and (prompt, chosen) safe per dialogue, then `benign` safe."""
    rows = []
    for d in dialogues:
        rows.append({"prompt": d.prompt, "response": d.rejected, "label": LABELS[1]})
        rows.append({"prompt": d.prompt, "response": d.chosen, "label": LABELS[0]})
    rows += [{"prompt": p, "response": r, "label": LABELS[0]} for p, r in benign]
    return rows


def precision_recall(predicted: list[bool], actual: list[bool]) -> dict[str, float | int]:
    """Precision, recall and accuracy of unsafe predictions (True = unsafe), with the counts."""
    tp = sum(p and a for p, a in zip(predicted, actual))
    fp = sum(p and not a for p, a in zip(predicted, actual))
    fn = sum(a and not p for p, a in zip(predicted, actual))
    n = len(actual)
    return {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "accuracy": sum(p == a for p, a in zip(predicted, actual)) / n if n else 0.0,
            "examples": n, "unsafe": sum(actual)}


class AdapterFilter:
    """fedtune's filter: a LoRA state for the run's own model, loaded only while it classifies.

    In simulation the clients share one model, so screening loads the filter's adapter, classifies, and
    puts the model's adapter back exactly as it was.
    """

    def __init__(self, model, tokenizer, state: dict[str, torch.Tensor], device: torch.device,
                 batch_size: int = 16) -> None:
        self.model, self.state, self.device, self.batch_size = model, state, device, batch_size
        self.task = filter_task(tokenizer)
        self.pad_id = tokenizer.pad_token_id

    @torch.no_grad()
    def unsafe(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """Whether each (prompt, response) is judged unsafe."""
        if not pairs:
            return []
        saved = adapter_state(self.model)
        was_training = self.model.training
        self.model.eval()
        load_adapter_state(self.model, self.state, what="safety filter")
        try:
            out: list[bool] = []
            examples = [self.task.encode({"prompt": p, "response": r, "label": LABELS[0]}, "label") for p, r in pairs]
            for i in range(0, len(examples), self.batch_size):
                batch = {k: v.to(self.device) for k, v in
                         collate(examples[i:i + self.batch_size], self.pad_id, with_target=False).items()}
                scores = label_scores(self.model, batch, self.task.first_token_ids)
                out += (scores.argmax(-1) == 1).tolist()
            return out
        finally:
            load_adapter_state(self.model, saved)
            self.model.train(was_training)


def train_filter(model, tokenizer, rows: list[dict[str, str]], *, steps: int, lr: float, batch_size: int,
                 seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Train the model's LoRA (from its current state) to answer each row's label; return the filter state
    and leave the model's adapter as it was."""
    task = filter_task(tokenizer)
    examples = [task.encode(r, "label") for r in rows]
    saved = adapter_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    # Balance the two labels in every batch: the filter split is half unsafe, the benign rows are all safe.
    by_label = {0: [e for e in examples if e.label == 0], 1: [e for e in examples if e.label == 1]}
    was_training = model.training
    model.train()
    try:
        for _ in range(steps):
            chunk = (rng.sample(by_label[1], min(batch_size // 2, len(by_label[1])))
                     + rng.sample(by_label[0], min(batch_size - batch_size // 2, len(by_label[0]))))
            batch = {k: v.to(device) for k, v in collate(chunk, tokenizer.pad_token_id, with_target=False).items()}
            loss = F.cross_entropy(label_scores(model, batch, task.first_token_ids), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        state = adapter_state(model)
    finally:
        load_adapter_state(model, saved)
        model.train(was_training)
    return state


class HFFilter:
    """A Hugging Face classifier or guard model (id or local path) as the filter."""

    def __init__(self, name: str, device: torch.device, batch_size: int = 16) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise ValueError(f"safety.filter = {name!r} is neither `none`, `trained` nor a loadable Hugging Face "
                             f"model id or local path ({type(err).__name__}: {str(err)[:200]}).") from None
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        archs = " ".join(config.architectures or [])
        self.guard = "CausalLM" in archs
        cls = AutoModelForCausalLM if self.guard else AutoModelForSequenceClassification
        self.model = cls.from_pretrained(name).to(device).eval()
        self.device, self.batch_size = device, batch_size
        labels = getattr(config, "id2label", None) or {}
        named = [i for i, n in labels.items() if _UNSAFE_NAMES.search(str(n))]
        self.unsafe_ids = set(named) if named else ({1} if len(labels) == 2 else set())
        if not self.guard and not self.unsafe_ids:
            raise ValueError(f"safety.filter = {name!r}: its labels {labels} name no unsafe class (unsafe, toxic, "
                             "harmful, ...): choose a safety classifier.")

    @torch.no_grad()
    def unsafe(self, pairs: list[tuple[str, str]]) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(pairs), self.batch_size):
            chunk = pairs[i:i + self.batch_size]
            if self.guard:
                out += [self._guard_verdict(p, r) for p, r in chunk]
                continue
            enc = self.tokenizer([p for p, _ in chunk], [r for _, r in chunk], truncation=True, max_length=512,
                                 padding=True, return_tensors="pt").to(self.device)
            out += [int(k) in self.unsafe_ids for k in self.model(**enc).logits.argmax(-1).tolist()]
        return out

    def _guard_verdict(self, prompt: str, response: str) -> bool:
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        ids = self.tokenizer.apply_chat_template(chat, return_tensors="pt", add_generation_prompt=True)
        ids = (ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids).to(self.device)
        gen = self.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        verdict = self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        return verdict.strip().lower().startswith("unsafe")


# --------------------------------------------------------------------------- in a run


def benign_filter_pairs(c, n: int = 64) -> list[tuple[str, str]]:
    """Benign task pairs for the filter's safe class: for ``data.source: demo-replies``, `n` tickets generated
    with another seed (drawn fresh, so no client's or test example); none for other sources."""
    if c.data.source != "demo-replies":
        return []
    from .data.demo_replies import REPLY_PROMPT, make_reply_task

    rows, _ = make_reply_task(seed=c.seed + 1000, n_train=n, n_test=0)
    prompt = c.data.prompt or REPLY_PROMPT
    return [(prompt.format_map(r), r["reply"]) for r in rows]


def build(ctx):
    """The run's filter, made once (`RunContext.owned`): trained, loaded, or an HF model."""
    s = ctx.config.safety
    if s.filter != "trained":
        return HFFilter(s.filter, ctx.device)
    if s.filter_adapter:
        return AdapterFilter(ctx.model, ctx.tokenizer, load_filter_adapter(ctx.model, s.filter_adapter), ctx.device)
    cached = cache_dir(ctx.config)
    if s.filter_cache and (cached / "adapter_model.safetensors").is_file():
        state = load_filter_adapter(ctx.model, cached)
        record = json.loads((cached / "fedtune_filter.json").read_text())["record"]
        record["cached_from"] = str(cached)
        ctx.log(record)
        save_filter_adapter(ctx.model, state, ctx.path / "safety_filter", record)
        filt = AdapterFilter(ctx.model, ctx.tokenizer, state, ctx.device)
    else:
        filt, record = _train_and_validate(ctx)
        save_filter_adapter(ctx.model, filt.state, ctx.path / "safety_filter", record)
        if s.filter_cache:
            save_filter_adapter(ctx.model, filt.state, cached, record)
    v = record["validation"]
    ctx.bars.print(f"safety filter: precision {v['precision']:.3f}, recall {v['recall']:.3f} on {v['examples']} "
                   f"held-out pairs; saved to {ctx.path / 'safety_filter'}")
    return filt


def _train_and_validate(ctx) -> tuple[AdapterFilter, dict[str, Any]]:
    """Train fedtune's filter on the filter split, score it on the held-out part; the filter and its record."""
    s = ctx.config.safety
    splits = hh_splits(s.harmful_source, s.split_seed)
    benign = benign_filter_pairs(ctx.config, 96)
    train_rows = pair_rows(splits["filter_train"], benign[:64])
    val_rows = pair_rows(splits["filter_val"], benign[64:])
    meter = ComputeMeter(ctx.device, count_flops=ctx.config.train.count_flops)
    with meter:
        state = train_filter(ctx.model, ctx.tokenizer, train_rows, steps=s.filter_steps, lr=s.filter_lr,
                             batch_size=s.filter_batch_size, seed=ctx.config.seed, device=ctx.device)
    filt = AdapterFilter(ctx.model, ctx.tokenizer, state, ctx.device)
    started = time.perf_counter()
    predicted = filt.unsafe([(r["prompt"], r["response"]) for r in val_rows])
    actual = [r["label"] == LABELS[1] for r in val_rows]
    hh = len(val_rows) - len(benign[64:])
    record = {"type": "safety_filter_trained", "train_examples": len(train_rows), "steps": s.filter_steps,
              "train_seconds": meter.seconds, "train_flops": meter.flops if ctx.config.train.count_flops else None,
              "validation": precision_recall(predicted, actual),
              "validation_hh": precision_recall(predicted[:hh], actual[:hh]),
              "validation_benign_flagged": sum(predicted[hh:]), "validation_benign": len(val_rows) - hh,
              "validation_seconds": time.perf_counter() - started}
    ctx.log(record)
    return filt, record


def cache_dir(c) -> Path:
    """Where fedtune keeps a trained filter for reuse: under the model cache, keyed by everything it depends on
    (model, LoRA shape, filter data and split, training settings, seed, prompt)."""
    from .models import cache_root

    s = c.safety
    source = Path(s.harmful_source)
    key = json.dumps({"model": c.model.name, "dtype": c.model.dtype, "peft": dataclasses.asdict(c.peft),
                      "source": [str(source.resolve()), source.stat().st_size if source.is_file() else None],
                      "split_seed": s.split_seed, "steps": s.filter_steps, "lr": s.filter_lr,
                      "batch_size": s.filter_batch_size, "seed": c.seed, "benign": benign_filter_pairs(c, 96),
                      "prompt": FILTER_PROMPT, "labels": LABELS}, sort_keys=True)
    return cache_root() / "safety-filter" / hashlib.sha256(key.encode()).hexdigest()[:16]


def save_filter_adapter(model, state: dict[str, torch.Tensor], path: Path, record: dict | None = None) -> None:
    """The filter's adapter in PEFT format (adapter_config.json + adapter_model.safetensors) at `path`."""
    saved = adapter_state(model)
    load_adapter_state(model, state)
    try:
        model.save_pretrained(path)
    finally:
        load_adapter_state(model, saved)
    (path / "fedtune_filter.json").write_text(json.dumps({"prompt": FILTER_PROMPT, "labels": list(LABELS),
                                                          "record": record}))


def load_filter_adapter(model, path: str | Path) -> dict[str, torch.Tensor]:
    """A filter adapter saved by `save_filter_adapter`, as a state for `model` (keys checked on use)."""
    from safetensors.torch import load_file

    f = Path(path) / "adapter_model.safetensors"
    if not f.is_file():
        raise ValueError(f"safety.filter_adapter = {str(path)!r} holds no adapter_model.safetensors: give the "
                         "safety_filter folder of an earlier run.")
    raw = load_file(str(f))
    # PEFT saves keys without the adapter name; the model's state keys have it the same way (adapter_state).
    expect = set(adapter_state(model))
    if set(raw) != expect:
        raise ValueError(f"safety.filter_adapter = {str(path)!r} does not fit this model's LoRA (peft.* must match "
                         "the run that trained it).")
    return raw


def screen(examples: list, unsafe: list[bool], action: str, task) -> tuple[list, dict[str, int]]:
    """Drop (or, ``refuse``, re-target to `REFUSAL`) the examples judged unsafe; return them and the counts."""
    kept = []
    for e, bad in zip(examples, unsafe):
        if not bad:
            kept.append(e)
        elif action == "refuse":
            target = task.tokenizer(REFUSAL, add_special_tokens=False)["input_ids"] + list(task.eos_ids)
            prompt_ids, target = task._fit(list(e.prompt_ids), target)
            kept.append(Pair(prompt_ids, target, None, REFUSAL, e.prompt_text, REFUSAL, e.harmful))
    harmful = [getattr(e, "harmful", False) for e in examples]
    counts = {"examples": len(examples), "flagged": sum(unsafe), "kept": len(kept),
              "harmful": sum(harmful), "flagged_harmful": sum(u and h for u, h in zip(unsafe, harmful)),
              "flagged_benign": sum(u and not h for u, h in zip(unsafe, harmful))}
    return kept, counts


def client_examples(ctx, node: int) -> list:
    """Client `node`'s training examples after its own screening (all of them with ``safety.filter: none``).

    Runs where the client's data is: only the counts are logged, the pairs stay with the client.
    """
    examples = ctx.client_examples(node)
    s = ctx.config.safety
    if s.filter == "none":
        return examples
    filt = ctx.owned("safety_filter", lambda: build(ctx), lambda f: None)
    unsafe = filt.unsafe([(e.prompt_text, e.response_text) for e in examples])
    kept, counts = screen(examples, unsafe, s.filter_action, ctx.data.task)
    ctx.log({"type": "safety_filter", "client": node, "action": s.filter_action, **counts})
    if not kept:
        raise ValueError(f"client {node}: the safety filter judged all {len(examples)} training pairs unsafe; use "
                         "safety.filter_action: refuse or another filter.")
    return kept
