"""KD-FedLLM's steps on the fast path (`fedtune.train.graphed`): static shapes, per-shape CUDA graphs.

Three functions of the one model that KD's clients and server share in a simulation, each a `GraphedFn`:

* ``train``: the private training loss of a right-padded batch (`fedtune.train.losses.static_loss`, FedLLM's);
* ``distil``: the distillation loss toward soft labels on a right-padded batch of public prompts;
* ``logits``: the compressed-logits pass on the public set (forward only, under ``torch.no_grad``).

Their inputs are built here from the eager path's (`public_args`, `teacher_args`): prompts right-padded to a
multiple of `graphed.BUCKET` tokens, the positions whose logits travel as index tensors, and the soft labels
of a top-k union padded to a multiple of `BUCKET` entries with probability 0 (an entry of probability 0 adds
exactly nothing to the loss). The losses and the logits at every real position are the eager path's
(tests/test_kd_fast.py); the optimizer step stays the caller's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import distill
from ..data.tasks import IGNORE, collate
from ..models import backbone
from ..train.graphed import BUCKET, GraphedFn, fast_path, flop_counts, pad_width, padded_width, shared, to_device
from ..train.losses import hidden_states, static_loss


class KDFast:
    """The graphed functions of KD on one model (see the module docstring); `fast_for` builds and shares them."""

    def __init__(self, model, public, *, graphs: bool, device: torch.device) -> None:
        self.device = torch.device(device)
        self.mode = public.mode
        params = [p for p in model.parameters() if p.requires_grad]
        self.flop_counts = flop_counts(model)
        T = public.temperature
        head = model.get_output_embeddings()
        label_ids = torch.tensor(public.label_ids, dtype=torch.long, device=self.device)
        vocab = public.vocab

        def labels_logits(ids, last):
            h = hidden_states(model, ids)
            rows = h[torch.arange(h.shape[0], device=h.device), last]
            logits = rows @ head.weight[label_ids].T
            if getattr(head, "bias", None) is not None:
                logits = logits + head.bias[label_ids]
            return logits.float()

        def position_logits(ids, b, t):
            h = hidden_states(model, ids)
            return head(h[b, t]).float()[:, :vocab]

        if public.mode == "labels":
            logits: Callable = labels_logits

            def loss(ids, last, probs):
                return distill.distill_loss(labels_logits(ids, last), probs, T)
        elif public.mode == "topk":
            logits = position_logits

            def loss(ids, b, t, teacher_ids, probs):
                return distill.sparse_distill_loss(position_logits(ids, b, t), teacher_ids, probs, T)
        else:
            logits = position_logits

            def loss(ids, b, t, probs):
                return distill.distill_loss(position_logits(ids, b, t), probs, T)

        self.train = GraphedFn(lambda ids, labels: static_loss(model, ids, labels), params, graphs=graphs,
                               name="KD private step", model=model)
        self.distil = GraphedFn(loss, params, graphs=graphs, name="KD distillation step", model=model)
        self.logits = GraphedFn(logits, (), graphs=graphs, name="KD public logits", model=model)

    # ------------------------------------------------------------------ inputs

    def train_args(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated private batch, right-padded: (input_ids, labels) on the device."""
        width = padded_width(batch["input_ids"].shape[1])
        return (to_device(pad_width(batch["input_ids"], width, 0), self.device),
                to_device(pad_width(batch["labels"], width, IGNORE), self.device))

    def public_args(self, public, idx: list[int]) -> tuple[torch.Tensor, ...]:
        """Prompts `idx` right-padded, and where their logits are read: ``last`` (labels) or the positions."""
        batch = collate([public.examples[i] for i in idx], public.pad_id, with_target=False)
        ids = to_device(pad_width(batch["input_ids"], padded_width(batch["input_ids"].shape[1]), 0), self.device)
        if public.mode == "labels":
            return ids, to_device(batch["last"], self.device)
        b = torch.cat([torch.full((public.spans[i][1] - public.spans[i][0],), j) for j, i in enumerate(idx)])
        t = torch.cat([torch.arange(*public.spans[i]) for i in idx])
        return ids, to_device(b, self.device), to_device(t, self.device)

    def padded_labels(self, labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Top-k soft labels with their union padded to a multiple of `BUCKET` entries (probability 0, id 0), so a
        round's union width does not make a new graph; other soft labels as they are."""
        if "ids" not in labels:
            return labels
        width = padded_width(labels["ids"].shape[1], BUCKET)
        return {"ids": pad_width(labels["ids"], width, 0), "probs": pad_width(labels["probs"], width, 0.0)}

    def teacher_args(self, public, idx: list[int], labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The soft labels of prompts `idx`' rows (`padded_labels` first for top-k)."""
        rows = to_device(public.rows_of(idx), self.device)  # pinned: a pageable copy would wait for the GPU
        if public.mode == "topk":
            return labels["ids"][rows], labels["probs"][rows]
        return (labels["probs"][rows],)


def key_of(kind: str, args: tuple[torch.Tensor, ...]) -> tuple:
    """The FLOP-cache key of a fast-path call: what fixes its shapes."""
    return (kind, *(tuple(a.shape) for a in args))


def fast_for(model, public, settings, device: torch.device) -> KDFast | None:
    """The `KDFast` of (model, public set) shared by every client and the server, or None off the fast path."""
    static, graphs = fast_path(settings, device)
    if not static:
        return None
    key = ("kd", public.mode, tuple(public.label_ids), public.vocab, public.temperature, graphs, str(device))
    return shared(model, key, lambda: KDFast(model, public, graphs=graphs, device=device))
