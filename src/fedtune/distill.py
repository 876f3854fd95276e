"""Knowledge-distillation math, written once: top-k compression, aggregation of soft labels, KL losses.

Conventions (every function below follows them):

* Soft labels are probability distributions at temperature ``T``: ``softmax(logits / T)``.
* A client's top-k reply ``(ids, values)`` stands for the distribution ``softmax(values / T)`` over
  its k ids only: the probability mass the client puts outside its top-k is dropped and the rest is
  renormalized. Equivalently, the client gives probability 0 to every id outside its top-k.
* Sparse distributions are ``(ids, probs)`` pairs of equal shape ``(positions, width)``. An entry
  whose probability is 0 is padding; its id is irrelevant (0 by convention). Ids may repeat in a row
  only with the meaning "add these probabilities".
* Losses are ``T**2 * KL(teacher || student)`` averaged over positions (rows), the scaling of Hinton
  et al., "Distilling the Knowledge in a Neural Network" (2015), which keeps the gradient size
  independent of ``T``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def topk_compress(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row, as they travel: ids (int32) and values (float16).

    Args:
        logits: ``(positions, vocab)``.
        k: How many to keep, ``1 <= k <= vocab``.

    Returns:
        ``(ids, values)``, both ``(positions, k)``, largest first.
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top-k needs 1 <= k <= {logits.shape[-1]} (the vocabulary), got k = {k}")
    values, ids = logits.float().topk(k, dim=-1)
    return ids.to(torch.int32), values.to(torch.float16)


def topk_dense(ids: torch.Tensor, values: torch.Tensor, vocab: int, fill: float = float("-inf")) -> torch.Tensor:
    """The inverse of `topk_compress`: a ``(positions, vocab)`` float32 tensor, `fill` outside the top-k.

    With ``fill = -inf`` its softmax is the renormalized top-k distribution (``topk_probs``, made dense).
    """
    out = torch.full((ids.shape[0], vocab), fill, dtype=torch.float32, device=values.device)
    return out.scatter_(-1, ids.long(), values.float())


def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / T)`` over the last dimension, in float32.

    Applied to top-k values this is the client's renormalized top-k distribution.
    """
    return torch.softmax(logits.float() / temperature, dim=-1)


def normalize(p: torch.Tensor) -> torch.Tensor:
    """Rows rescaled to sum to 1 (float32), e.g. after soft labels travelled in float16."""
    p = p.float()
    return p / p.sum(dim=-1, keepdim=True)


def _unit_weights(weights: Sequence[float], n: int) -> list[float]:
    if n == 0:
        raise ValueError("aggregation needs at least one client")
    if len(weights) != n:
        raise ValueError(f"{n} clients but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative and not all zero, got {list(weights)}")
    return [float(w) / total for w in weights]


def aggregate_dense(client_probs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean of the clients' probabilities (same shape each), float32.

    Args:
        client_probs: One ``(positions, classes)`` tensor of probabilities per client.
        weights: Non-negative weights (e.g. example counts), not all zero.
    """
    unit = _unit_weights(weights, len(client_probs))
    acc = torch.zeros_like(client_probs[0], dtype=torch.float32)
    for p, w in zip(client_probs, unit):
        acc.add_(p.to(acc.device, torch.float32), alpha=w)
    return acc


def aggregate_topk(
    clients: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of sparse distributions over the union of their ids, row by row.

    A client gives probability 0 to every id outside its own support, so for each id ``v`` of the union
    ``p(v) = sum_i w_i p_i(v) / sum_i w_i``; the result is then renormalized (a no-op up to rounding
    when every client's probabilities sum to 1).

    Args:
        clients: One ``(ids, probs)`` pair per client, each ``(positions, k_i)``; same positions for all.
        weights: Non-negative weights (e.g. example counts), not all zero.

    Returns:
        ``(ids, probs)``: ids int64 ``(positions, U)`` and float32 probabilities, where U is the largest
        union size of any row; shorter rows end in padding (probability 0, id 0).
    """
    unit = _unit_weights(weights, len(clients))
    ids = torch.cat([i.long() for i, _ in clients], dim=-1)
    p = torch.cat([q.float() * w for (_, q), w in zip(clients, unit)], dim=-1)
    sorted_ids, order = ids.sort(dim=-1)
    sorted_p = p.gather(-1, order)
    # Equal ids are now adjacent: give each run of equal ids one slot and add its probabilities there.
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    slot = starts.long().cumsum(dim=-1) - 1
    width = int(slot.max()) + 1 if slot.numel() else 0
    out_p = torch.zeros(ids.shape[0], width, dtype=torch.float32, device=p.device).scatter_add_(-1, slot, sorted_p)
    out_ids = torch.zeros(ids.shape[0], width, dtype=torch.long, device=ids.device).scatter_(-1, slot, sorted_ids)
    return out_ids, normalize(out_p)


def distill_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T**2 * KL(teacher || softmax(student / T))``, averaged over positions.

    Args:
        student_logits: ``(positions, classes)``, differentiable.
        teacher_probs: ``(positions, classes)``, rows summing to 1.
        temperature: ``T > 0``.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = teacher_probs.float()
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)
    return kl.mean() * temperature**2


def sparse_distill_loss(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`distill_loss` for a sparse teacher ``(ids, probs)`` without building it densely.

    The teacher gives probability 0 outside its ids, so
    ``KL = sum_j p_j log p_j - sum_j p_j log q(ids_j)`` with ``q = softmax(student / T)`` over the whole
    vocabulary: the student is also pushed to put no mass outside the teacher's support.

    Args:
        student_logits: ``(positions, vocab)``, differentiable.
        teacher_ids: ``(positions, width)`` token ids (padding: any id with probability 0).
        teacher_probs: ``(positions, width)``, rows summing to 1.
        temperature: ``T > 0``.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_ids.long())
    p = teacher_probs.float()
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)
    return kl.mean() * temperature**2
