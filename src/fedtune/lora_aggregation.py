"""The math of averaging LoRA adapters, and of adapters of different ranks.

A LoRA module adds ``s · B A`` to a frozen weight (``A``: r × in, ``B``: out × r, ``s`` the scaling). The
server can average the clients' adapters in three ways:

* **separate** (FedAvg on A and B): ``mean(B) · mean(A)``, which is not the mean of the products
  ``mean(B A)``; `separate_gap` measures by how much.
* **zero-padding** (HetLoRA, Cho et al. 2024): each adapter padded with zeros to the largest rank, then
  averaged as above. For equal ranks it is exactly separate averaging (`zero_pad_mean`).
* **exact products** (FlexLoRA, Bai et al. 2024): ``ΔW = Σ p_k B_k A_k`` per module (`product_mean`), given
  back to a client of rank r as the best rank-r approximation, the truncated SVD ``U_r S_r V_rᵀ`` split as
  ``B = U_r S_r^½``, ``A = S_r^½ V_rᵀ`` (`svd_split`). Exact whenever rank(ΔW) <= r (e.g. when the ranks of
  the clients sum to at most r).
* **stacking** (FLoRA, Wang et al. 2024): ``[p_1 B_1 … p_K B_K] [A_1; …; A_K]`` is ΔW exactly, at rank
  ``Σ r_k`` (`stack`).

All of this is on ``B A``: every client of a run uses the same scaling ``s`` (the global model's, at rank
``peft.r``), so products of different ranks add up as they are. States use PEFT's key names
(``….lora_A.weight``, ``….lora_B.weight``); entries that are not LoRA pairs are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

State = dict[str, torch.Tensor]
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The LoRA modules of a state: the key prefixes that have both an A and a B entry, in key order."""
    prefixes = [k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX)]
    odd = [k for k in state if not (k.endswith(A_SUFFIX) or k.endswith(B_SUFFIX))]
    odd += [p + B_SUFFIX for p in prefixes if p + B_SUFFIX not in state]
    odd += [k for k in state if k.endswith(B_SUFFIX) and k[: -len(B_SUFFIX)] + A_SUFFIX not in state]
    if odd:
        raise ValueError(f"not a plain LoRA state (pairs of lora_A / lora_B weights): {sorted(odd)[:3]}")
    return prefixes


def rank_of(state: Mapping[str, torch.Tensor]) -> int:
    """The rank of a LoRA state (every module must have the same)."""
    ranks = {state[p + A_SUFFIX].shape[0] for p in modules(state)}
    if len(ranks) != 1:
        raise ValueError(f"a LoRA state of mixed ranks {sorted(ranks)}")
    return ranks.pop()


def truncate(state: Mapping[str, torch.Tensor], rank: int) -> State:
    """The first `rank` components: A's first rows, B's first columns (a copy)."""
    out: State = {}
    for p in modules(state):
        out[p + A_SUFFIX] = state[p + A_SUFFIX][:rank].clone()
        out[p + B_SUFFIX] = state[p + B_SUFFIX][:, :rank].clone()
    return out


def zero_pad(state: Mapping[str, torch.Tensor], rank: int) -> State:
    """The state at `rank` >= its own, the new components zero (the product B A is unchanged)."""
    out: State = {}
    for p in modules(state):
        a, b = state[p + A_SUFFIX], state[p + B_SUFFIX]
        if a.shape[0] > rank:
            raise ValueError(f"cannot zero-pad a rank-{a.shape[0]} adapter to rank {rank}")
        out[p + A_SUFFIX] = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        out[p + B_SUFFIX] = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
    return out


def _probabilities(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if not weights or total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative and not all zero, got {list(weights)}")
    return [w / total for w in weights]


def zero_pad_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], rank: int) -> State:
    """HetLoRA's aggregate: the weighted mean of the states zero-padded to `rank` (float32)."""
    probs = _probabilities(weights)
    padded = [zero_pad(s, rank) for s in states]
    return {k: sum(p * s[k].float() for p, s in zip(probs, padded)) for k in padded[0]}


def products(state: Mapping[str, torch.Tensor]) -> State:
    """Module prefix -> B A (float32)."""
    return {p: state[p + B_SUFFIX].float() @ state[p + A_SUFFIX].float() for p in modules(state)}


def product_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """Module prefix -> the weighted mean of the clients' products, ``Σ p_k B_k A_k`` (float32; any ranks)."""
    probs = _probabilities(weights)
    out: State = {}
    for p_k, s in zip(probs, states):
        for name, prod in products(s).items():
            out[name] = out[name] + p_k * prod if name in out else p_k * prod
    return out


def svd_split(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of rank `rank` with ``B A`` the best rank-`rank` approximation of `delta` (truncated SVD,
    the singular values split evenly: ``B = U S^½``, ``A = S^½ Vᵀ``)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    a = root[:, None] * vh[:k]
    b = u[:, :k] * root[None, :]
    if k < rank:  # a matrix smaller than the rank: the rest is zero
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
    return a, b


def redistribute(deltas: Mapping[str, torch.Tensor], rank: int) -> State:
    """FlexLoRA's global adapter at `rank` from the per-module products (a client of rank r <= `rank` gets
    `truncate` of it: the SVD's components are ordered, so that is its own best rank-r approximation)."""
    out: State = {}
    for p, delta in deltas.items():
        out[p + A_SUFFIX], out[p + B_SUFFIX] = svd_split(delta, rank)
    return out


def stack(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """FLoRA's stacked adapter: A's stacked, B's side by side each times its client's weight, so that
    ``B A = Σ p_k B_k A_k`` exactly, at rank ``Σ r_k``."""
    probs = _probabilities(weights)
    names = modules(states[0])
    out: State = {}
    for p in names:
        out[p + A_SUFFIX] = torch.cat([s[p + A_SUFFIX].float() for s in states])
        out[p + B_SUFFIX] = torch.cat([w * s[p + B_SUFFIX].float() for w, s in zip(probs, states)], dim=1)
    return out


def separate_gap(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> float:
    """How far averaging A and B separately lands from the mean of the products, over all modules:
    ``‖mean(B) mean(A) − mean(B A)‖_F / ‖mean(B A)‖_F`` (0 when they agree; states zero-padded to the
    largest rank first, as HetLoRA averages them)."""
    rank = max(rank_of(s) for s in states)
    separate = products(zero_pad_mean(states, weights, rank))
    exact = product_mean(states, weights)
    num = sum(float((separate[p] - exact[p]).pow(2).sum()) for p in exact)
    den = sum(float(exact[p].pow(2).sum()) for p in exact)
    return (num / den) ** 0.5 if den > 0 else 0.0
