"""LoRA aggregation math (fedtune.lora_aggregation) against hand computations."""

from __future__ import annotations

import pytest
import torch

from fedtune import lora_aggregation as la

A, B = "m.lora_A.weight", "m.lora_B.weight"


def lora(a, b):
    return {A: torch.tensor(a, dtype=torch.float32), B: torch.tensor(b, dtype=torch.float32)}


def test_zero_pad_and_truncate_by_hand():
    s = lora([[1.0, 2.0]], [[3.0], [4.0]])  # rank 1, in 2, out 2
    p = la.zero_pad(s, 3)
    assert p[A].tolist() == [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]
    assert p[B].tolist() == [[3.0, 0.0, 0.0], [4.0, 0.0, 0.0]]
    assert torch.equal(la.truncate(p, 1)[A], s[A]) and torch.equal(la.truncate(p, 1)[B], s[B])
    with pytest.raises(ValueError, match="zero-pad"):
        la.zero_pad(p, 2)


def test_zero_pad_mean_is_exactly_separate_averaging_for_equal_ranks():
    s1 = lora([[1.0, 0.0]], [[2.0], [0.0]])
    s2 = lora([[0.0, 3.0]], [[0.0], [1.0]])
    got = la.zero_pad_mean([s1, s2], [1, 3], 1)
    # by hand: 1/4 * s1 + 3/4 * s2
    assert got[A].tolist() == [[0.25, 2.25]]
    assert got[B].tolist() == [[0.5], [0.75]]


def test_zero_pad_mean_of_different_ranks_by_hand():
    s1 = lora([[1.0, 1.0]], [[1.0], [1.0]])  # rank 1
    s2 = lora([[2.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]])  # rank 2
    got = la.zero_pad_mean([s1, s2], [1, 1], 2)
    assert got[A].tolist() == [[1.5, 0.5], [0.0, 1.0]]
    assert got[B].tolist() == [[1.0, 0.0], [0.5, 0.5]]


def test_product_mean_and_the_gap_of_separate_averaging_by_hand():
    s1 = lora([[1.0, 0.0]], [[1.0], [0.0]])  # B A = [[1, 0], [0, 0]]
    s2 = lora([[0.0, 1.0]], [[0.0], [1.0]])  # B A = [[0, 0], [0, 1]]
    exact = la.product_mean([s1, s2], [1, 1])["m"]
    assert exact.tolist() == [[0.5, 0.0], [0.0, 0.5]]
    # separate: mean B = [.5, .5]^T, mean A = [.5, .5] -> product all 0.25; difference [[.25,.25],[.25,.25]]
    # ||diff||_F = 0.5, ||exact||_F = sqrt(0.5)  ->  gap = 0.5 / 0.7071 = 0.7071
    assert la.separate_gap([s1, s2], [1, 1]) == pytest.approx(0.5 / 0.5 ** 0.5)
    assert la.separate_gap([s1, s1], [1, 2]) == pytest.approx(0.0)


def test_flexlora_recovers_the_exact_mean_product_of_rank_one_clients():
    torch.manual_seed(0)
    clients = [lora(torch.randn(1, 6).tolist(), torch.randn(5, 1).tolist()) for _ in range(3)]
    weights = [2, 1, 5]
    exact = sum(w * c[B] @ c[A] for w, c in zip(weights, clients)) / sum(weights)  # by hand
    deltas = la.product_mean(clients, weights)
    assert torch.allclose(deltas["m"], exact, atol=1e-6)
    glob = la.redistribute(deltas, 3)  # rank 3 >= 3 rank-1 clients: exact
    assert torch.allclose(glob[B] @ glob[A], exact, atol=1e-5)
    # rank 2 cannot hold a rank-3 product: the best rank-2 approximation (Eckart-Young), not the product
    two = la.truncate(glob, 2)
    s = torch.linalg.svdvals(exact)
    assert torch.linalg.matrix_norm(two[B] @ two[A] - exact) == pytest.approx(float(s[2]), rel=1e-4)


def test_stacking_is_exact_at_the_sum_of_ranks():
    torch.manual_seed(1)
    c1 = lora(torch.randn(1, 4).tolist(), torch.randn(3, 1).tolist())
    c2 = lora(torch.randn(2, 4).tolist(), torch.randn(3, 2).tolist())
    st = la.stack([c1, c2], [3, 1])
    assert st[A].shape == (3, 4) and st[B].shape == (3, 3)
    assert torch.allclose(st[B] @ st[A], 0.75 * c1[B] @ c1[A] + 0.25 * c2[B] @ c2[A], atol=1e-6)


def test_non_lora_states_are_refused():
    with pytest.raises(ValueError, match="plain LoRA"):
        la.modules({"m.ia3_l": torch.ones(3)})
    with pytest.raises(ValueError, match="plain LoRA"):
        la.modules({A: torch.ones(1, 2)})
