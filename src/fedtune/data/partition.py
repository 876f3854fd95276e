"""Split a data set's example indices across federated clients.

Schemes:

* ``iid``: shuffle, then split as evenly as possible.
* ``dirichlet``: label (or any key) skew; each key value's examples are spread over the
  clients with proportions drawn from Dirichlet(alpha). Small alpha = strongly non-IID.
* ``by_field``: one client per distinct key value (a natural partition, e.g. by product).
* ``quantity``: quantity skew; client sizes drawn from Dirichlet(alpha), contents random.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Sequence

import numpy as np
from rich.table import Table

SCHEMES = ("iid", "dirichlet", "by_field", "quantity")
# Enough resamples for feasible settings to succeed, few enough to fail fast otherwise.
_MAX_DIRICHLET_TRIES = 1000


def partition_indices(
    scheme: str,
    num_clients: int,
    seed: int,
    *,
    keys: Sequence | None = None,
    n: int | None = None,
    alpha: float = 0.5,
    min_per_client: int = 1,
) -> list[list[int]]:
    """Assign each example index to exactly one client.

    Args:
        scheme: One of ``SCHEMES``.
        num_clients: Number of clients (for ``by_field``: the number of distinct keys).
        seed: Seed for the numpy Generator; the same arguments give the same partition.
        keys: One hashable key per example (label or category field). Required for
            ``dirichlet`` and ``by_field``; ``n`` is taken from its length.
        n: Number of examples; needed when ``keys`` is None.
        alpha: Dirichlet concentration for ``dirichlet`` and ``quantity`` (> 0).
        min_per_client: Smallest allowed client size for ``dirichlet`` and ``quantity``.

    Returns:
        One sorted list of indices per client; together they cover ``range(n)`` once.

    Raises:
        ValueError: On an unknown scheme, bad sizes, alpha <= 0, missing keys, or when
            no partition meets ``min_per_client``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    key_list = list(keys) if keys is not None else None
    total = _resolve_n(key_list, n)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > total:
        raise ValueError(
            f"num_clients={num_clients} is more than the {total} examples available; "
            "use fewer clients or more data so every client gets at least one example"
        )
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0 (small = more skewed, e.g. 0.1 .. 100), got {alpha!r}")
    if isinstance(min_per_client, bool) or not isinstance(min_per_client, int) or min_per_client < 0:
        raise ValueError(f"min_per_client must be an integer >= 0, got {min_per_client!r}")

    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = [chunk.tolist() for chunk in np.array_split(rng.permutation(total), num_clients)]
    elif scheme == "quantity":
        parts = _quantity(total, num_clients, alpha, min_per_client, rng)
    else:
        if key_list is None:
            raise ValueError(
                f"scheme {scheme!r} needs `keys` (one label or category value per example); "
                "pass keys=[record[field] for record in records] or use scheme 'iid' / 'quantity'"
            )
        if scheme == "by_field":
            parts = _by_field(key_list, num_clients)
        else:
            parts = _dirichlet(key_list, num_clients, alpha, min_per_client, rng)

    parts = [sorted(int(i) for i in part) for part in parts]
    assert sum(len(part) for part in parts) == total, "partition lost or duplicated indices"
    return parts


def label_histogram(parts: Sequence[Sequence[int]], labels: Sequence) -> Table:
    """Build a rich table of per-client sizes and label counts.

    Args:
        parts: Client index lists as returned by ``partition_indices``.
        labels: One label (or any key) per example, indexed by example index.

    Returns:
        A ``rich.table.Table`` with one row per client: id, size, count per label value.
    """
    values = _sorted_values(labels)
    table = Table(title="Examples per client", caption=f"skew (mean TV distance to global) = {skew(parts, labels):.3f}")
    table.add_column("client", justify="right")
    table.add_column("size", justify="right")
    for value in values:
        table.add_column(str(value), justify="right")
    for client_id, part in enumerate(parts):
        counts = Counter(labels[i] for i in part)
        table.add_row(str(client_id), str(len(part)), *(str(counts.get(value, 0)) for value in values))
    return table


def skew(parts: Sequence[Sequence[int]], keys: Sequence) -> float:
    """Measure how non-IID a partition is.

    The score is the mean, over non-empty clients, of the total-variation distance
    between the client's key distribution and the distribution over all partitioned
    examples: 0 means every client looks like the whole, 1 means disjoint supports.

    Args:
        parts: Client index lists.
        keys: One key per example, indexed by example index.

    Returns:
        The skew score in [0, 1].
    """
    values = _sorted_values(keys)
    position = {value: i for i, value in enumerate(values)}
    counts = np.zeros((len(parts), len(values)))
    for client_id, part in enumerate(parts):
        for i in part:
            counts[client_id, position[keys[i]]] += 1
    sizes = counts.sum(axis=1)
    if sizes.sum() == 0:
        return 0.0
    global_dist = counts.sum(axis=0) / sizes.sum()
    nonempty = sizes > 0
    client_dist = counts[nonempty] / sizes[nonempty, None]
    distances = 0.5 * np.abs(client_dist - global_dist).sum(axis=1)
    return float(distances.mean())


def _resolve_n(keys: list | None, n: int | None) -> int:
    if keys is None and n is None:
        raise ValueError("give either `keys` (one value per example) or `n` (the number of examples)")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer (the number of examples), got {n!r}")
    if keys is not None:
        if n is not None and n != len(keys):
            raise ValueError(f"n={n} does not match len(keys)={len(keys)}; pass only `keys`, or make them agree")
        if not keys:
            raise ValueError("keys is empty; there are no examples to partition")
        return len(keys)
    assert n is not None
    return n


def _sorted_values(keys: Sequence) -> list[Hashable]:
    distinct = set(keys)
    try:
        return sorted(distinct)
    except TypeError:
        # Mixed types (e.g. 1 and "1") cannot be compared; order them stably by type and text.
        return sorted(distinct, key=lambda value: (type(value).__name__, str(value)))


def _group(keys: list) -> list[np.ndarray]:
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return [np.array(groups[value]) for value in _sorted_values(keys)]


def _by_field(keys: list, num_clients: int) -> list[list[int]]:
    values = _sorted_values(keys)
    if len(values) != num_clients:
        shown = ", ".join(repr(v) for v in values[:20]) + (" ..." if len(values) > 20 else "")
        raise ValueError(
            f"scheme 'by_field' makes one client per distinct value, and the field has {len(values)} "
            f"values ({shown}); set num_clients={len(values)} (it is {num_clients})"
        )
    return [group.tolist() for group in _group(keys)]


def _dirichlet(
    keys: list, num_clients: int, alpha: float, min_per_client: int, rng: np.random.Generator
) -> list[list[int]]:
    if min_per_client * num_clients > len(keys):
        raise ValueError(
            f"cannot give {num_clients} clients {min_per_client} examples each from {len(keys)} examples; "
            "lower num_clients or min_per_client"
        )
    groups = _group(keys)
    smallest = 0
    for _ in range(_MAX_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for group in groups:
            shuffled = rng.permutation(group)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(int)
            for client_id, chunk in enumerate(np.split(shuffled, cuts)):
                parts[client_id].extend(chunk.tolist())
        smallest = min(len(part) for part in parts)
        if smallest >= min_per_client:
            return parts
    raise ValueError(
        f"dirichlet partition with alpha={alpha} left some client with only {smallest} examples "
        f"(< min_per_client={min_per_client}) in {_MAX_DIRICHLET_TRIES} tries; use a larger alpha, "
        "fewer clients, a smaller min_per_client, or more data"
    )


def _quantity(
    total: int, num_clients: int, alpha: float, min_per_client: int, rng: np.random.Generator
) -> list[list[int]]:
    floor = min_per_client
    spare = total - floor * num_clients
    if spare < 0:
        raise ValueError(
            f"cannot give {num_clients} clients {floor} examples each from {total} examples; "
            "lower num_clients or min_per_client"
        )
    # Guarantee the floor first, then hand out the rest by Dirichlet shares, so no resampling is needed.
    proportions = rng.dirichlet(np.full(num_clients, alpha))
    sizes = floor + rng.multinomial(spare, proportions)
    cuts = np.cumsum(sizes)[:-1]
    return [chunk.tolist() for chunk in np.split(rng.permutation(total), cuts)]
