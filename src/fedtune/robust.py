"""Robust aggregation: what the server averages when some clients may send poisoned updates.

Every strategy (FedAvg, FedAvgM, FedAdam) starts from one average of the clients' states; `combine`
is that average, chosen by ``federation.aggregator``:

* ``mean``: the example-weighted mean (`strategies.weighted_mean`), FedAvg's own;
* ``norm_bound``: each client's update (its state minus the global one) is scaled down to an L2 norm of
  at most ``federation.norm_bound`` before the weighted mean (Sun et al., 2019), so no client moves the
  model further than the bound times its weight;
* ``median``: the coordinate-wise median of the states (Yin et al., 2018), unweighted;
* ``trimmed_mean``: per coordinate, the ``trim_fraction`` largest and smallest values are dropped and the
  rest averaged (Yin et al., 2018), unweighted;
* ``krum``: (multi-)Krum (Blanchard et al., 2017): each update is scored by the sum of squared distances
  to its n - f - 2 nearest others (``krum_f``: the attackers to tolerate), and the ``krum_m`` best-scored
  are averaged by weight.

FedAvgM and FedAdam take the robust average as the target of their pseudo-gradient, so the defences
compose with server momentum and server Adam. Separately, `cap_weights` keeps a forged ``num_examples``
from owning the average: no weight may exceed ``federation.max_weight`` times the median weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]

AGGREGATORS = ("mean", "norm_bound", "median", "trimmed_mean", "krum")


@dataclass
class Aggregator:
    """How the server averages the clients' states (``federation.aggregator`` and its parameters)."""

    kind: str = "mean"
    norm_bound: float | None = None
    trim_fraction: float = 0.1
    krum_f: int = 1
    krum_m: int = 1
    max_weight: float | None = 10.0

    def __post_init__(self) -> None:
        if self.kind not in AGGREGATORS:
            raise ValueError(f"federation.aggregator = {self.kind!r} is not one of {', '.join(AGGREGATORS)}")
        if self.kind == "norm_bound" and not (self.norm_bound is not None and self.norm_bound > 0):
            raise ValueError(f"federation.norm_bound = {self.norm_bound!r}: the norm_bound aggregator needs a "
                             "positive bound on each update's L2 norm (e.g. federation.norm_bound=1.0)")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"federation.trim_fraction = {self.trim_fraction!r} must be in [0, 0.5)")
        if self.krum_f < 0 or self.krum_m < 1:
            raise ValueError(f"federation.krum_f = {self.krum_f!r} must be >= 0 and federation.krum_m = "
                             f"{self.krum_m!r} >= 1")
        if self.max_weight is not None and not self.max_weight >= 1:
            raise ValueError(f"federation.max_weight = {self.max_weight!r} must be >= 1 (a multiple of the median "
                             "weight) or null (no cap)")


def cap_weights(weights: Sequence[float], multiple: float | None) -> tuple[list[float], list[str]]:
    """Each weight capped at `multiple` times the median weight; returns the weights and one note per cap.

    A client claiming 10**9 examples among clients of ~100 then weighs at most ``multiple`` times a typical
    client, instead of owning the average.
    """
    weights = [float(w) for w in weights]
    if multiple is None or not weights:
        return weights, []
    ordered = sorted(weights)
    median = ordered[len(ordered) // 2] if len(ordered) % 2 else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    cap = multiple * median
    notes = [f"num_examples {w:g} capped at {cap:g} (federation.max_weight = {multiple:g} x the median {median:g})"
             for w in weights if w > cap]
    return [min(w, cap) for w in weights], notes


def _flat(states: Sequence[Mapping[str, torch.Tensor]], keys: list[str], device) -> torch.Tensor:
    """The states as rows of one float32 matrix (clients x parameters)."""
    return torch.stack([torch.cat([s[k].to(device, torch.float32).reshape(-1) for k in keys]) for s in states])


def _unflat(row: torch.Tensor, like: Mapping[str, torch.Tensor], keys: list[str]) -> State:
    parts = row.split([like[k].numel() for k in keys])
    return {k: p.view(like[k].shape) for k, p in zip(keys, parts)}


def combine(global_state: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]],
            weights: Sequence[float], agg: Aggregator) -> State:
    """The robust average of `states` (float32) that `agg` describes (any kind but ``mean``, which is
    `strategies.weighted_mean`: `strategies.average` picks); see the module docstring.

    `global_state` is what the updates are measured from (``norm_bound``, ``krum``).
    """
    assert agg.kind != "mean", "the mean is strategies.weighted_mean"
    keys = list(global_state)
    device = global_state[keys[0]].device
    for s in states:
        if set(s) != set(keys):
            raise ValueError(f"states have different keys: {sorted(set(keys) ^ set(s))}")
    reference = torch.cat([global_state[k].to(device, torch.float32).reshape(-1) for k in keys])
    rows = _flat(states, keys, device)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=device)
    if agg.kind == "norm_bound":
        deltas = rows - reference
        norms = deltas.norm(dim=1, keepdim=True)
        scale = torch.clamp(agg.norm_bound / norms.clamp_min(1e-30), max=1.0)
        out = reference + (deltas * scale * (w / w.sum()).unsqueeze(1)).sum(0)
    elif agg.kind == "median":
        # torch.median takes the lower of the two middle values; the mean of both is the textbook median.
        ordered = rows.sort(dim=0).values
        n = ordered.shape[0]
        out = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    elif agg.kind == "trimmed_mean":
        n = rows.shape[0]
        k = int(agg.trim_fraction * n)
        out = rows.sort(dim=0).values[k:n - k].mean(0)
    else:  # krum
        out = krum(rows, w, agg.krum_f, agg.krum_m)
    return _unflat(out, global_state, keys)


def krum_scores(rows: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each row: the sum of squared distances to its n - f - 2 nearest other rows."""
    n = rows.shape[0]
    neighbours = max(1, n - f - 2)
    d = torch.cdist(rows.double(), rows.double()).pow(2)
    d.fill_diagonal_(float("inf"))
    return d.sort(dim=1).values[:, :min(neighbours, n - 1)].sum(1)


def krum(rows: torch.Tensor, weights: torch.Tensor, f: int, m: int = 1) -> torch.Tensor:
    """(Multi-)Krum: the weighted mean of the `m` rows with the lowest `krum_scores` (one row: plain Krum)."""
    if rows.shape[0] == 1:
        return rows[0]
    chosen = krum_scores(rows, f).argsort()[:min(m, rows.shape[0])]
    w = weights[chosen]
    return (rows[chosen] * (w / w.sum()).unsqueeze(1)).sum(0)
