"""KD-FedLLM's public set: the prompts every party holds, and the logits computed and exchanged on them.

`PublicSet` knows what travels for a task (the label words' logits for classification; top-k or full
next-token logits at the positions after the prompts' common prefix for generation), how to compute a
model's compressed logits on it, how to check a client's reply, how to aggregate soft labels, and the
distillation loss toward them. See `fedtune.paradigms.kd` for the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distill
from ..data.tasks import Example, collate
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

    @torch.no_grad()
    def reply_tensors(self, model, device: torch.device) -> dict[str, torch.Tensor]:
        """What a client sends up: its compressed logits on the whole public set."""
        was_training = model.training
        model.eval()
        parts: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, len(self.examples), self.batch_size):
            logits = self.student_logits(model, list(range(start, min(start + self.batch_size,
                                                                       len(self.examples)))), device)
            parts.append(distill.topk_compress(logits, self.top_k) if self.mode == "topk" else (logits.half(),))
        model.train(was_training)
        if self.mode == "topk":
            return {"ids": torch.cat([p[0] for p in parts]), "values": torch.cat([p[1] for p in parts])}
        return {"logits": torch.cat([p[0] for p in parts])}

    def reply_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The names, shapes and dtypes a client's reply must have."""
        if self.mode == "topk":
            return {"ids": ((self.rows, self.top_k), torch.int32), "values": ((self.rows, self.top_k), torch.float16)}
        return {"logits": ((self.rows, self.width), torch.float16)}

    def check_reply(self, reply: Message) -> None:
        """Names, shapes, dtypes, finite values (`wire.check`) and, for top-k, ids inside the vocabulary."""
        check(reply, self.reply_spec())
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
            return {"ids": ids, "probs": probs}
        return {"probs": distill.aggregate_dense([distill.probs(t["logits"].to(device), T) for t, _ in updates],
                                                 weights)}

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
    batch_size: int,
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
                         pad_id)
    return PublicSet(examples, "full" if full_logits else "topk", [], distill_spans(examples), vocab, top_k,
                     temperature, batch_size, pad_id)
