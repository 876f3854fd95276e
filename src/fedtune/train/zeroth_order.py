"""Zeroth-order training with a shared pool of seeds (FedKSeed's math), written once and tested once.

A pool of K seeds is shared by everyone; seed k draws the perturbation direction z_k (a standard normal
vector over the tuned parameters, flattened). One step estimates the projected gradient along z_k with
two forward passes and no backward,

    g = (L(w + eps z_k) - L(w - eps z_k)) / (2 eps),

and moves ``w += (-lr g) z_k``. Every change to the weights is a sum of ``scalar * z_k`` terms, so the
pairs (k, scalar) describe it completely: `apply` replays them, and a replay of the same pairs from the
same weights gives bitwise the same weights (the very same float operations in the same order), which
is what lets a server or a late client rebuild a model from seeds and scalars alone.

The weights are one flat float32 vector (`flat`); `write` copies it into the parameters it came from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from .adapter import unflatten

SEED_SPACE = 2**31 - 1


def pool_seed(run_seed: int, k: int) -> int:
    """The generator seed of the pool's k-th direction (every party derives the pool from the run seed)."""
    return (run_seed * 1_000_003 + 7919 * (k + 1)) % SEED_SPACE


def direction(run_seed: int, k: int, n: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """z_k: ``n`` standard normal values drawn on the CPU from the pool's k-th seed (same on every device)."""
    g = torch.Generator().manual_seed(pool_seed(run_seed, k))
    return torch.randn(n, generator=g, dtype=torch.float32).to(device, dtype)


def flat(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parameters as one new flat vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in params])


@torch.no_grad()
def write(params: Sequence[torch.Tensor], w: torch.Tensor) -> None:
    """Copy the flat vector `w` into `params` in place (their order is the flat order)."""
    torch._foreach_copy_(list(params), unflatten(w.to(params[0].device, params[0].dtype), list(params)))


@torch.no_grad()
def update(w: torch.Tensor, z: torch.Tensor, scalar: float) -> None:
    """``w += scalar * z`` in place: the one update every step and every replay makes."""
    w.add_(z, alpha=float(scalar))


def apply(w: torch.Tensor, pairs: Iterable[tuple[int, float]], run_seed: int) -> torch.Tensor:
    """Replay ``(seed index, scalar)`` pairs onto `w` in order (in place); returns `w`."""
    for k, scalar in pairs:
        update(w, direction(run_seed, int(k), w.numel(), w.device, w.dtype), scalar)
    return w


def to_wire(x: float) -> float:
    """`x` rounded to float32, as it travels: both sides update with the value the server receives."""
    return float(torch.tensor(x, dtype=torch.float32))


@torch.no_grad()
def projected_gradient(loss: Callable[[], float], params: Sequence[torch.Tensor], w: torch.Tensor, z: torch.Tensor,
                       eps: float) -> tuple[float, float, float]:
    """(g, L(w + eps z), L(w - eps z)) with two calls of `loss`, which reads the model's `params`.

    Leaves `params` holding ``w - eps z``: the caller updates `w` and writes it back.

    The weights are written from `w` each time rather than perturbed back and forth, so no rounding
    drift accumulates and the step is exactly ``w += (-lr g) z``.
    """
    write(params, w + eps * z)
    plus = float(loss())
    write(params, w - eps * z)
    minus = float(loss())
    return (plus - minus) / (2 * eps), plus, minus


def per_seed_sums(pairs: Iterable[tuple[int, float]], num_seeds: int) -> torch.Tensor:
    """The scalars summed per seed index, a (num_seeds,) float64 vector."""
    out = torch.zeros(num_seeds, dtype=torch.float64)
    for k, s in pairs:
        out[int(k)] += float(s)
    return out
