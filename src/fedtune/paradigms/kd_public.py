"""KD-FedLLM's public set: the prompts every party holds, the logits computed and exchanged on them, and the
distillation steps toward soft labels on it (with keep-best).

`PublicSet` knows what travels for a task (the label words' logits for classification; top-k or full
next-token logits at the positions after the prompts' common prefix for generation), how to compute a
model's compressed logits on it, how to check a client's reply, how to aggregate soft labels, and the
distillation loss toward them. See `fedtune.paradigms.kd` for the protocol.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import distill
from ..data.sources import load_records, require_fields
from ..data.tasks import Example, collate
from ..flops import FlopCache
from ..strategies import weighted_mean
from ..train.adapter import State, adapter_state, load_adapter_state
from ..train.local_steps import TrainSettings, batches, clip_and_step, make_optimizer
from ..train.losses import hidden_states, label_scores
from ..wire import Message, WireError, check, spec_of

SoftLabels = dict[str, torch.Tensor]  # "probs" (rows, width) float32, plus "ids" (rows, width) int64 for top-k


def distill_spans(public: list[Example]) -> list[tuple[int, int]]:
    """For each public prompt, the positions ``[start, end)`` whose next-token logits travel (generation).

    Positions inside the prefix that all public prompts share are skipped (their logits do not depend on
    the prompt); every prompt keeps at least its last position, which predicts the first response token.
    """
    first = public[0].prompt_ids
    common = len(first)
    for e in public[1:]:
        n = 0
        for a, b in zip(first, e.prompt_ids):
            if a != b:
                break
            n += 1
        common = min(common, n)
    return [(min(common, len(e.prompt_ids) - 1), len(e.prompt_ids)) for e in public]


@dataclass
class PublicSet:
    """The public prompts and the logits KD computes and exchanges on them (shared by server and clients).

    Attributes:
        examples: The prompts (no targets).
        mode: ``labels`` (classification), ``topk`` or ``full`` (generation).
        label_ids: ``labels``: the label words' first token ids.
        spans: ``topk``/``full``: per prompt, the positions that travel (`distill_spans`).
        vocab: Logits are compared over ids ``0 .. vocab - 1`` (the tokenizer's length).
        top_k: ``topk``: ids kept per position.
        temperature: Of the soft labels and of the loss.
        batch_size: Prompts per forward pass and per distillation step.
        pad_id: Padding token.
        vote_correction: ``labels``: ``prior`` when clients send prior-corrected logits (`distill.prior_correct_logits`).
        class_weighting: ``labels``: weight each class's votes by the clients' label counts (they send them).
        sharpen: Power applied to the aggregated soft labels (`distill.sharpen`); None: none.
    """

    examples: list[Example]
    mode: str
    label_ids: list[int]
    spans: list[tuple[int, int]]
    vocab: int
    top_k: int
    temperature: float
    batch_size: int
    pad_id: int
    vote_correction: str = "none"
    class_weighting: bool = False
    sharpen: float | None = None

    def __post_init__(self) -> None:
        sizes = [1] * len(self.examples) if self.mode == "labels" else [e - s for s, e in self.spans]
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)

    @property
    def rows(self) -> int:
        """Rows of every logits tensor: prompts (classification) or positions (generation)."""
        return self.offsets[-1]

    @property
    def width(self) -> int:
        return {"labels": len(self.label_ids), "topk": self.top_k, "full": self.vocab}[self.mode]

    def rows_of(self, idx: list[int]) -> torch.Tensor:
        """The rows that belong to prompts `idx`, in the order `student_logits` returns them."""
        return torch.cat([torch.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])

    def student_logits(self, model, idx: list[int], device: torch.device) -> torch.Tensor:
        """Logits of prompts `idx` (float32, differentiable): (rows, labels) or (rows, vocab)."""
        batch = {k: v.to(device) for k, v in collate([self.examples[i] for i in idx], self.pad_id,
                                                     with_target=False).items()}
        if self.mode == "labels":
            return label_scores(model, batch, self.label_ids)
        h = hidden_states(model, batch["input_ids"], batch["attention_mask"])
        b = torch.cat([torch.full((self.spans[i][1] - self.spans[i][0],), j) for j, i in enumerate(idx)])
        t = torch.cat([torch.arange(*self.spans[i]) for i in idx])
        # The LM head runs only on the positions that travel (as in losses.lm_loss_from_hidden).
        return model.get_output_embeddings()(h[b.to(device), t.to(device)]).float()[:, : self.vocab]

    def shape_key(self, idx: list[int]) -> tuple[int, ...]:
        """What fixes the shapes of a pass over prompts `idx`: their count, the padded width, the positions."""
        width = max(len(self.examples[i].prompt_ids) for i in idx)
        positions = len(idx) if self.mode == "labels" else sum(e - s for s, e in (self.spans[i] for i in idx))
        return len(idx), width, positions

    @torch.no_grad()
    def reply_tensors(self, model, device: torch.device, prior: torch.Tensor | None = None,
                      flops: FlopCache | None = None, fast=None) -> dict[str, torch.Tensor]:
        """What a client sends up: its compressed logits on the whole public set.

        ``prior`` (``labels`` mode): the client's label prior; its logits are then prior-corrected before they travel.
        ``flops``: counts each batch shape's forward once. ``fast``: the `kd_fast.KDFast` of the fast path.
        """
        flops = flops or FlopCache(enabled=False)
        was_training = model.training
        model.eval()
        parts: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, len(self.examples), self.batch_size):
            idx = list(range(start, min(start + self.batch_size, len(self.examples))))
            if fast is not None:
                args = fast.public_args(self, idx)
                with flops.block(("public logits", *(tuple(a.shape) for a in args))):
                    logits = fast.logits(*args)
            else:
                with flops.block(("public logits", *self.shape_key(idx))):
                    logits = self.student_logits(model, idx, device)
            if prior is not None:
                logits = distill.prior_correct_logits(logits, prior, self.temperature)
            parts.append(distill.topk_compress(logits, self.top_k) if self.mode == "topk" else (logits.half(),))
        model.train(was_training)
        if self.mode == "topk":
            return {"ids": torch.cat([p[0] for p in parts]), "values": torch.cat([p[1] for p in parts])}
        return {"logits": torch.cat([p[0] for p in parts])}

    def reply_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The names, shapes and dtypes a client's reply must have."""
        if self.mode == "topk":
            return {"ids": ((self.rows, self.top_k), torch.int32), "values": ((self.rows, self.top_k), torch.float16)}
        spec = {"logits": ((self.rows, self.width), torch.float16)}
        if self.class_weighting:
            spec["label_counts"] = ((self.width,), torch.int32)
        return spec

    def check_reply(self, reply: Message, extra: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None) -> None:
        """Names, shapes, dtypes, finite values (`wire.check`) and, for top-k, ids inside the vocabulary.

        ``extra``: more tensors the reply must carry (``kd.mode = hybrid``: the adapter, as `ADAPTER` + key).
        """
        check(reply, {**self.reply_spec(), **(extra or {})})
        if "label_counts" in reply.tensors and bool((reply.tensors["label_counts"] < 0).any()):
            raise WireError("label_counts must be non-negative")
        if self.mode == "topk":
            ids = reply.tensors["ids"]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
                raise WireError(f"top-k ids must lie in [0, {self.vocab}), got [{int(ids.min())}, {int(ids.max())}]")

    def soft_labels(self, updates: list[tuple[dict[str, torch.Tensor], float]], device: torch.device) -> SoftLabels:
        """Example-weighted mean of the clients' probabilities at temperature T (float32, on `device`)."""
        weights = [n for _, n in updates]
        T = self.temperature
        if self.mode == "topk":
            ids, probs = distill.aggregate_topk(
                [(t["ids"].to(device), distill.probs(t["values"].to(device), T)) for t, _ in updates], weights)
            return {"ids": ids, "probs": self._sharpened(probs)}
        votes = [distill.probs(t["logits"].to(device), T) for t, _ in updates]
        if self.class_weighting:
            probs = distill.aggregate_class_weighted(votes, [t["label_counts"] for t, _ in updates])
        else:
            probs = distill.aggregate_dense(votes, weights)
        return {"probs": self._sharpened(probs)}

    def _sharpened(self, probs: torch.Tensor) -> torch.Tensor:
        return probs if self.sharpen is None else distill.sharpen(probs, self.sharpen)

    def to_wire(self, labels: SoftLabels) -> dict[str, torch.Tensor]:
        """The compact form sent down: float16 probabilities (and int32 ids for top-k)."""
        out = {"probs": labels["probs"].half()}
        if "ids" in labels:
            out["ids"] = labels["ids"].to(torch.int32)
        return out

    def from_wire(self, tensors: dict[str, torch.Tensor], device: torch.device) -> SoftLabels:
        """Validate soft labels received from the server and make them float32 distributions again."""
        width = None if self.mode == "topk" else self.width  # a top-k union is as wide as it is
        probs = tensors.get("probs")
        if probs is None or probs.dim() != 2 or probs.shape[0] != self.rows or width not in (None, probs.shape[1]):
            raise WireError(f"soft labels must be 'probs' of shape ({self.rows}, {width or 'U'}), got "
                            f"{None if probs is None else tuple(probs.shape)}")
        check(Message(tensors), spec_of(tensors))  # finite values
        if not bool((probs >= 0).all()) or not bool((probs.float().sum(-1) > 0).all()):
            raise WireError("soft labels must be non-negative with a positive total in every row")
        out = {"probs": distill.normalize(probs.to(device))}
        if self.mode == "topk":
            ids = tensors.get("ids")
            if ids is None or ids.shape != probs.shape or ids.is_floating_point():
                raise WireError(f"top-k soft labels need integer 'ids' of shape {tuple(probs.shape)}")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
                raise WireError(f"soft-label ids must lie in [0, {self.vocab})")
            out["ids"] = ids.to(device).long()
        return out

    def loss(self, model, idx: list[int], labels: SoftLabels, device: torch.device) -> torch.Tensor:
        """Distillation loss of `model` toward `labels` on prompts `idx`."""
        student = self.student_logits(model, idx, device)
        rows = self.rows_of(idx).to(device)
        if self.mode == "topk":
            return distill.sparse_distill_loss(student, labels["ids"][rows], labels["probs"][rows], self.temperature)
        return distill.distill_loss(student, labels["probs"][rows], self.temperature)


def make_public_set(
    examples: list[Example], task, *, vocab: int, pad_id: int, top_k: int, full_logits: bool, temperature: float,
    batch_size: int, vote_correction: str = "none", class_weighting: bool = False, sharpen: float | None = None,
) -> PublicSet:
    """Build the `PublicSet` of a task, failing fast on settings that cannot work."""
    if not examples:
        raise ValueError("the KD public set is empty: give kd.public_source a file with rows, or raise "
                         "kd.public_fraction.")
    if top_k > vocab:
        raise ValueError(f"kd.top_k = {top_k} is larger than the vocabulary ({vocab} tokens): choose "
                         f"kd.top_k <= {vocab} (a few dozen at most is the point of compressing).")
    if task.kind == "classification":
        return PublicSet(examples, "labels", list(task.first_token_ids), [], vocab, top_k, temperature, batch_size,
                         pad_id, vote_correction, class_weighting, sharpen)
    if vote_correction != "none" or class_weighting:
        raise ValueError("kd.vote_correction and kd.class_weighting need a classification task (label priors).")
    return PublicSet(examples, "full" if full_logits else "topk", [], distill_spans(examples), vocab, top_k,
                     temperature, batch_size, pad_id, sharpen=sharpen)


# --------------------------------------------------------------------------- distillation on the public set


def step(loss: torch.Tensor, params: list[torch.Tensor], opt: torch.optim.Optimizer, max_grad_norm) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip_and_step(params, opt, max_grad_norm)


def distil(model, opt, public: PublicSet, labels: SoftLabels, steps: int, rng: random.Random, *,
           device: torch.device, max_grad_norm, on_step: Callable[[float | None], None] | None = None,
           flops: FlopCache | None = None, fast=None) -> list[float]:
    """`steps` optimizer steps of the distillation loss on batches of public prompts; returns the losses.

    ``flops``: counts each batch shape's step once (`flops.FlopCache`). ``fast``: the `kd_fast.KDFast` of the
    fast path (static shapes, graphs); its losses stay on the device until the end, and ``on_step`` gets None.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    flops = flops or FlopCache(enabled=False)
    losses: list[float] = []
    kept: list[torch.Tensor] = []
    model.train()
    teacher = fast.padded_labels(labels) if fast is not None else labels
    for idx in batches(list(range(len(public.examples))), public.batch_size, steps, rng):
        if fast is not None:
            args = (*fast.public_args(public, idx), *fast.teacher_args(public, idx, teacher))
            with flops.block(("distil", *(tuple(a.shape) for a in args))):
                loss = fast.distil(*args)
                step(loss, params, opt, max_grad_norm)
            kept.append(loss.detach().clone())  # the graph's output buffer is overwritten by the next replay
            if on_step:
                on_step(None)
            continue
        with flops.block(("distil", *public.shape_key(idx))):
            loss = public.loss(model, idx, labels, device)
            step(loss, params, opt, max_grad_norm)
        losses.append(float(loss.detach()))
        if on_step:
            on_step(losses[-1])
    return torch.stack(kept).tolist() if kept else losses


def distil_keep_best(model, opt, public: PublicSet, labels: SoftLabels, steps: int, rng: random.Random, *,
                     device: torch.device, max_grad_norm, score: Callable[[], float], every: int,
                     patience: int | None = None, flops: FlopCache | None = None,
                     fast=None) -> tuple[list[float], dict[str, Any]]:
    """`distil` with keep-best: score the model (on the server's validation split) before distilling and every
    `every` steps, and leave it at the best-scoring adapter seen, the starting one included.

    Ties keep the earlier adapter, so the model returned never scores below the one it started from.
    ``patience``: stop after that many scores in a row without improvement (early stopping).

    Returns:
        The losses of the steps taken, and ``{"val_start", "val_best", "best_step", "val_scores"}``.
    """
    best = start = score()
    best_state, best_step, scores, losses, stale = adapter_state(model), 0, [start], [], 0
    while len(losses) < steps and (patience is None or stale < patience):
        losses += distil(model, opt, public, labels, min(every, steps - len(losses)), rng, device=device,
                         max_grad_norm=max_grad_norm, flops=flops, fast=fast)
        scores.append(score())
        if scores[-1] > best:
            best, best_state, best_step, stale = scores[-1], adapter_state(model), len(losses), 0
        else:
            stale += 1
    load_adapter_state(model, {k: v.to(device) for k, v in best_state.items()})
    return losses, {"val_start": start, "val_best": best, "best_step": best_step, "val_scores": scores}


ADAPTER = "adapter/"
"""``kd.mode = hybrid``: the prefix of the adapter tensors in a client's reply (the rest are its logits)."""


def label_counts(examples: list[Example], labels: int) -> torch.Tensor:
    """How many of `examples` carry each label, int32 ``(labels,)``: a client's label histogram."""
    counts = torch.zeros(labels, dtype=torch.int32)
    for e in examples:
        counts[e.label] += 1
    return counts




def average_adapters(updates: list[tuple[dict[str, torch.Tensor], float]], model, settings: TrainSettings
                     ) -> tuple[State, torch.optim.Optimizer]:
    """Hybrid: the example-weighted mean (FedAvg) of the clients' adapters, and a fresh server optimizer for it."""
    states = [{k[len(ADAPTER):]: v for k, v in t.items() if k.startswith(ADAPTER)} for t, _ in updates]
    mean = weighted_mean(states, [n for _, n in updates])
    return mean, make_optimizer([p for p in model.parameters() if p.requires_grad], settings)


# --------------------------------------------------------------------------- what KD holds back from clients


def held_data(c, task, train_rows: list[dict], train: list[Example]) -> tuple[set[int], dict[str, list[Example]]]:
    """`Paradigm.held_data` for KD: the public prompts and the server's validation split, and the rows they take."""
    held, public = public_set(c, task, train_rows)
    val_rows, server_val = server_val_set(c, train, held)
    return held | val_rows, {"public": public, "server_val": server_val}


def public_set(c, task, train_rows: list[dict]) -> tuple[set[int], list[Example]]:
    """KD's public prompts, and the training rows they take from the clients.

    Either a separate file (nothing taken), or a seeded ``kd.public_fraction`` of the training
    rows, held back from every client with their labels dropped.
    """
    k = c.kd
    held: set[int] = set()
    if k.public_source:
        rows = load_records(k.public_source)
        require_fields(rows, task.fields, k.public_source)
    else:
        order = list(range(len(train_rows)))
        random.Random(c.seed + 1).shuffle(order)
        held = set(order[: int(len(train_rows) * k.public_fraction)])
        if k.public_size:
            held = set(sorted(held)[: k.public_size])
        rows = [train_rows[i] for i in sorted(held)]
    if k.public_size:
        rows = rows[: k.public_size]
    if not rows:
        raise ValueError(
            f"the KD public set is empty ({k.public_source or f'kd.public_fraction = {k.public_fraction}'}): "
            "give kd.public_source a file with rows, or raise kd.public_fraction."
        )
    return held, [task.encode_prompt({f: r[f] for f in task.fields}) for r in rows]


def server_val_set(c, train: list[Example], held: set[int]) -> tuple[set[int], list[Example]]:
    """KD keep-best: ``kd.val_size`` labeled training rows that only the server holds, and their indices.

    A seeded draw among the rows not already held back for the public set; like those, they are taken
    from every client. Never the test set: keep-best chooses checkpoints on it. None on a node that
    holds only its own data (no training rows here).
    """
    n = c.kd.val_size
    if n == 0 or not train:
        return set(), []
    order = [i for i in range(len(train)) if i not in held]
    random.Random(c.seed + 2).shuffle(order)
    if n >= len(order):
        raise ValueError(f"kd.val_size = {n} leaves no training rows for the clients ({len(order)} rows are not "
                         "in the public set): lower kd.val_size.")
    rows = set(order[:n])
    return rows, [train[i] for i in sorted(rows)]
