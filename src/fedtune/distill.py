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


# --------------------------------------------------------------------------- label skew (classification)
#
# Under label skew, a client's model is close to p_i(y | x) ∝ p(x | y) * prior_i(y): it votes for its own
# majority class on most prompts, and the example-weighted mean of the votes reproduces the prior of the
# largest clients. The three corrections below come from the federated-distillation literature
# (Selective-FD, DS-FL); docs/kd-findings.md measures them.


def label_prior(counts: torch.Tensor, smoothing: float = 1.0) -> torch.Tensor:
    """A client's label prior from its label counts, with additive (Laplace) smoothing, float32.

    ``(counts + smoothing) / (sum(counts) + classes * smoothing)``: a class the client never saw gets a small
    positive prior instead of 0, so dividing by the prior stays finite.

    Args:
        counts: ``(classes,)`` non-negative label counts.
        smoothing: Pseudo-count added to every class, ``> 0``.
    """
    if not smoothing > 0:
        raise ValueError(f"the prior's smoothing must be positive, got {smoothing}")
    counts = counts.float()
    if counts.dim() != 1 or bool((counts < 0).any()):
        raise ValueError(f"label counts must be a non-negative vector, got {counts.tolist()}")
    return (counts + smoothing) / (counts.sum() + smoothing * counts.numel())


def prior_correct(client_probs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Divide each row of probabilities by the client's label prior and renormalize (float32).

    If ``p(y | x) ∝ p(x | y) prior(y)``, the result is ``p(x | y)`` normalized over y: the vote the client
    would cast under a uniform prior.

    Args:
        client_probs: ``(positions, classes)``, rows summing to 1.
        prior: ``(classes,)``, positive (see `label_prior`).
    """
    if not bool((prior > 0).all()):
        raise ValueError("prior correction needs a positive prior for every class (smooth the counts)")
    return normalize(client_probs.float() / prior.to(client_probs.device).float())


def prior_correct_logits(logits: torch.Tensor, prior: torch.Tensor, temperature: float) -> torch.Tensor:
    """`prior_correct` in logit form: ``logits - T * log(prior)``, whose softmax at T is the corrected vote.

    A client sends this instead of its raw logits, so the wire format and the server's aggregation stay as
    they are (float32 out; the caller casts for the wire).
    """
    if not bool((prior > 0).all()):
        raise ValueError("prior correction needs a positive prior for every class (smooth the counts)")
    return logits.float() - temperature * prior.to(logits.device).float().log()


def aggregate_class_weighted(client_probs: Sequence[torch.Tensor], class_counts: Sequence[torch.Tensor]
                             ) -> torch.Tensor:
    """Per-class weighted mean of the clients' votes, each class weighted by the clients' counts of it.

    ``out[:, c] = sum_i n_ic p_i[:, c] / sum_i n_ic``, then rows renormalized: a client's vote for a class
    counts in proportion to how many examples of that class it trained on (zero for a class it never saw).
    A class no client holds gets the plain mean of the votes for it.

    Args:
        client_probs: One ``(positions, classes)`` tensor of probabilities per client.
        class_counts: One ``(classes,)`` tensor of label counts per client.
    """
    if not client_probs:
        raise ValueError("aggregation needs at least one client")
    if len(client_probs) != len(class_counts):
        raise ValueError(f"{len(client_probs)} clients but {len(class_counts)} label-count vectors")
    classes = client_probs[0].shape[-1]
    device = client_probs[0].device
    counts = torch.stack([c.to(device).float() for c in class_counts])  # (clients, classes)
    if counts.shape[1] != classes or bool((counts < 0).any()):
        raise ValueError(f"label counts must be non-negative vectors of {classes} classes, got {counts.tolist()}")
    total = counts.sum(0)
    w = torch.where(total > 0, counts / total.clamp_min(1e-12), torch.full_like(counts, 1.0 / len(client_probs)))
    acc = torch.zeros_like(client_probs[0], dtype=torch.float32)
    for p, wi in zip(client_probs, w):
        acc.add_(p.to(device).float() * wi)
    return normalize(acc)


def sharpen(p: torch.Tensor, power: float) -> torch.Tensor:
    """Entropy reduction of aggregated soft labels (DS-FL's ERA): ``p ** power`` renormalized, float32.

    ``power > 1`` sharpens (2 squares the probabilities), ``power = 1`` is the identity; equivalently
    ``softmax(log p * power)``. Rows stay distributions; zero entries stay zero.
    """
    if not power > 0:
        raise ValueError(f"sharpening needs a positive power, got {power}")
    p = p.float()
    # Scale each row by its max first, so large powers do not underflow to an all-zero row.
    p = p / p.amax(dim=-1, keepdim=True).clamp_min(1e-30)
    return normalize(p.pow(power))
