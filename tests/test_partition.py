"""Tests for fedtune.data.partition: every scheme is deterministic, disjoint and complete."""

from __future__ import annotations

import pytest
from rich.console import Console
from rich.table import Table

from fedtune.data.partition import label_histogram, partition_indices, skew

N = 6000
CLIENTS = 10
LABELS = [i % 6 for i in range(N)]
SCHEME_KWARGS = {
    "iid": {"n": N},
    "dirichlet": {"keys": LABELS, "alpha": 0.5},
    "quantity": {"n": N, "alpha": 0.5},
    "by_field": {"keys": [f"group{i % CLIENTS}" for i in range(N)]},
}


def _check_complete(parts: list[list[int]], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n)), "every index must be in exactly one client"
    assert all(part == sorted(part) for part in parts)
    assert all(isinstance(i, int) for i in flat)


@pytest.mark.parametrize("scheme", sorted(SCHEME_KWARGS))
def test_every_scheme_is_deterministic_disjoint_complete(scheme: str) -> None:
    kwargs = SCHEME_KWARGS[scheme]
    first = partition_indices(scheme, CLIENTS, 7, **kwargs)
    again = partition_indices(scheme, CLIENTS, 7, **kwargs)
    _check_complete(first, N, CLIENTS)
    assert first == again
    assert all(len(part) >= 1 for part in first)
    if scheme != "by_field":  # by_field has no randomness by design
        assert partition_indices(scheme, CLIENTS, 8, **kwargs) != first


def test_iid_sizes_are_even_and_low_skew() -> None:
    parts = partition_indices("iid", 7, 0, keys=LABELS)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert skew(parts, LABELS) < 0.1


def test_dirichlet_alpha_controls_skew() -> None:
    skewed = partition_indices("dirichlet", CLIENTS, 0, keys=LABELS, alpha=0.05)
    flat = partition_indices("dirichlet", CLIENTS, 0, keys=LABELS, alpha=1000)
    _check_complete(skewed, N, CLIENTS)
    assert skew(skewed, LABELS) > 0.5
    assert skew(flat, LABELS) < 0.1


def test_dirichlet_respects_min_per_client() -> None:
    parts = partition_indices("dirichlet", CLIENTS, 3, keys=LABELS, alpha=0.3, min_per_client=50)
    assert min(len(p) for p in parts) >= 50


def test_dirichlet_impossible_minimum_suggests_fix() -> None:
    keys = ["a"] * 30 + ["b"] * 30
    with pytest.raises(ValueError, match="larger alpha"):
        partition_indices("dirichlet", 6, 0, keys=keys, alpha=0.01, min_per_client=9)


def test_by_field_gives_one_value_per_client_in_sorted_order() -> None:
    products = ["lamp", "boots", "watch", "boots", "lamp", "kettle", "watch", "watch"]
    parts = partition_indices("by_field", 4, 0, keys=products)
    _check_complete(parts, len(products), 4)
    values = [{products[i] for i in part} for part in parts]
    assert values == [{"boots"}, {"kettle"}, {"lamp"}, {"watch"}]


def test_by_field_wrong_client_count_lists_values() -> None:
    with pytest.raises(ValueError) as info:
        partition_indices("by_field", 2, 0, keys=["x", "y", "z", "x"])
    message = str(info.value)
    assert "3 values" in message and "'x'" in message and "'z'" in message
    assert "num_clients=3" in message


def test_quantity_skew_small_alpha_gives_unequal_sizes() -> None:
    parts = partition_indices("quantity", CLIENTS, 0, n=N, alpha=0.1, min_per_client=5)
    _check_complete(parts, N, CLIENTS)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 5
    assert max(sizes) > 5 * min(sizes)
    even = [len(p) for p in partition_indices("quantity", CLIENTS, 0, n=N, alpha=1000)]
    assert max(even) < 1.3 * min(even)


def test_keys_as_label_strings_and_n_consistency() -> None:
    keys = ["pos", "neg"] * 50
    parts = partition_indices("dirichlet", 4, 1, keys=keys, n=100)
    _check_complete(parts, 100, 4)
    with pytest.raises(ValueError, match="does not match"):
        partition_indices("iid", 4, 1, keys=keys, n=99)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"scheme": "random", "num_clients": 2, "n": 10}, "iid, dirichlet, by_field, quantity"),
    ({"scheme": "iid", "num_clients": 0, "n": 10}, "num_clients"),
    ({"scheme": "iid", "num_clients": 11, "n": 10}, "more than the 10 examples"),
    ({"scheme": "quantity", "num_clients": 2, "n": 10, "alpha": 0}, "alpha"),
    ({"scheme": "dirichlet", "num_clients": 2, "n": 10, "alpha": -1.0}, "alpha"),
    ({"scheme": "dirichlet", "num_clients": 2, "n": 10}, "needs `keys`"),
    ({"scheme": "iid", "num_clients": 2}, "either `keys`"),
])
def test_bad_arguments_raise_value_error(kwargs: dict, fragment: str) -> None:
    scheme = kwargs.pop("scheme")
    num_clients = kwargs.pop("num_clients")
    with pytest.raises(ValueError, match=fragment):
        partition_indices(scheme, num_clients, 0, **kwargs)


def test_skew_extremes() -> None:
    keys = ["a", "a", "b", "b"]
    assert skew([[0, 2], [1, 3]], keys) == pytest.approx(0.0)
    assert skew([[0, 1], [2, 3]], keys) == pytest.approx(0.5)


def test_label_histogram_rows_and_counts() -> None:
    labels = ["b", "a", "b", "c", "a"]
    table = label_histogram([[0, 2], [1, 3, 4]], labels)
    assert isinstance(table, Table)
    assert [column.header for column in table.columns] == ["client", "size", "a", "b", "c"]
    assert table.row_count == 2
    cells = [list(column.cells) for column in table.columns]
    assert cells[1] == ["2", "3"]  # sizes
    assert cells[2] == ["0", "2"]  # label "a"
    assert cells[3] == ["2", "0"]  # label "b"
    console = Console(record=True, width=80)
    console.print(table)
    assert "client" in console.export_text()
