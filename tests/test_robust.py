"""Robust aggregation on hand-made updates: each result equals the one computed by hand; one huge update barely moves it."""

from __future__ import annotations

import pytest
import torch

from fedtune import config as cfg
from fedtune.robust import Aggregator, cap_weights, combine, krum_scores
from fedtune.rounds import aggregate
from fedtune.strategies import FedAvg, FedAvgM, average, make_strategy

ZERO = {"w": torch.zeros(1)}


def states(*values):
    return [{"w": torch.tensor([float(v)])} for v in values]


def test_median_and_trimmed_mean_equal_the_hand_computed_values():
    odd, even = states(1, 2, 3, 4, 100), states(1, 2, 3, 100)
    assert combine(ZERO, odd, [1] * 5, Aggregator("median"))["w"].item() == 3.0
    assert combine(ZERO, even, [1] * 4, Aggregator("median"))["w"].item() == 2.5  # the mean of the middle two
    # trim 0.2 of 5: one value off each end, (2 + 3 + 4) / 3
    assert combine(ZERO, odd, [1] * 5, Aggregator("trimmed_mean", trim_fraction=0.2))["w"].item() == 3.0
    # trim 0.1 of 5 rounds down to nothing dropped: the plain mean
    assert combine(ZERO, odd, [1] * 5, Aggregator("trimmed_mean", trim_fraction=0.1))["w"].item() == pytest.approx(22.0)
    # several tensors, per coordinate
    two = [{"a": torch.tensor([1.0, 10.0]), "b": torch.tensor([[5.0]])},
           {"a": torch.tensor([2.0, 30.0]), "b": torch.tensor([[-5.0]])},
           {"a": torch.tensor([9.0, 20.0]), "b": torch.tensor([[0.0]])}]
    out = combine({"a": torch.zeros(2), "b": torch.zeros(1, 1)}, two, [1, 1, 1], Aggregator("median"))
    assert out["a"].tolist() == [2.0, 20.0] and out["b"].tolist() == [[0.0]]


def test_krum_picks_the_update_closest_to_its_neighbours():
    # f = 1, n = 5: each score sums the squared distances to the n - f - 2 = 2 nearest others.
    # 0: 1 + 9 = 10; 1: 1 + 4 = 5; 3: 4 + 9 = 13; 7: 16 + 36 = 52; 100: 93^2 + 97^2
    rows = torch.tensor([[0.0], [1.0], [3.0], [7.0], [100.0]])
    assert krum_scores(rows, 1).tolist() == [10.0, 5.0, 13.0, 52.0, 93.0**2 + 97.0**2]
    ups = states(0, 1, 3, 7, 100)
    assert combine(ZERO, ups, [1] * 5, Aggregator("krum", krum_f=1))["w"].item() == 1.0
    # multi-Krum, m = 2: the example-weighted mean of the two best (1 with weight 3, 0 with weight 1)
    assert combine(ZERO, ups, [1, 3, 1, 1, 1], Aggregator("krum", krum_f=1, krum_m=2))["w"].item() == 0.75


def test_norm_bound_scales_each_update_down_to_the_bound():
    ups = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 0.5])}]  # norms 5 (clipped to 1) and 0.5
    out = combine({"w": torch.zeros(2)}, ups, [1, 1], Aggregator("norm_bound", norm_bound=1.0))
    torch.testing.assert_close(out["w"], torch.tensor([0.3, 0.65]))
    # measured from the global state, not from zero
    out = combine({"w": torch.tensor([10.0, 10.0])}, [{"w": torch.tensor([13.0, 14.0])}], [1],
                  Aggregator("norm_bound", norm_bound=1.0))
    torch.testing.assert_close(out["w"], torch.tensor([10.6, 10.8]))


@pytest.mark.parametrize("agg, bound", [
    (Aggregator("norm_bound", norm_bound=0.1), 0.1 / 10 + 0.05),  # the attacker moves it by at most bound x weight
    (Aggregator("median"), 0.05),
    (Aggregator("trimmed_mean", trim_fraction=0.1), 0.05),
    (Aggregator("krum", krum_f=1), 0.05),
    (Aggregator("krum", krum_f=1, krum_m=5), 0.05),
])
def test_one_update_of_norm_1e6_among_nine_honest_ones_barely_moves_the_robust_aggregate(agg, bound):
    g = torch.Generator().manual_seed(0)
    glob = {"a": torch.randn(64, generator=g), "b": torch.randn(8, 8, generator=g)}
    honest = [{k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in glob.items()} for _ in range(9)]
    flat = lambda s: torch.cat([s[k].reshape(-1) for k in sorted(s)])
    attack = {k: v + 1e6 * torch.ones_like(v) / (128 ** 0.5) for k, v in glob.items()}  # an update of norm 1e6
    assert (flat(attack) - flat(glob)).norm().item() == pytest.approx(1e6, rel=1e-4)
    honest_mean = flat(average(glob, [(s, 1.0) for s in honest], None))
    got = flat(combine(glob, honest + [attack], [1.0] * 10, agg))
    assert (got - honest_mean).norm().item() < bound
    # the plain mean is dragged 1e5 away
    assert (flat(average(glob, [(s, 1.0) for s in honest + [attack]], None)) - honest_mean).norm() > 1e4


def test_robust_aggregation_composes_with_server_momentum():
    glob, ups = {"w": torch.tensor([1.0])}, [(s, 1.0) for s in states(1, 2, 3, 4, 100)]
    strategy = make_strategy("fedavgm", 0.5, 0.0, Aggregator("median"))
    # FedAvgM's pseudo-gradient targets the median (3): w - lr (w - 3) = 1 - 0.5 * (1 - 3)
    assert strategy.aggregate(glob, ups)["w"].item() == 2.0
    assert isinstance(make_strategy("fedavg", None, 0.9, Aggregator("krum")), FedAvg)


def test_a_client_claiming_1e9_examples_is_capped_at_a_multiple_of_the_median_with_the_reason():
    weights, notes = cap_weights([100, 120, 80, 1e9], 10)
    assert weights == [100, 120, 80, 1100.0]  # the median of 4 is (100 + 120) / 2 = 110
    assert len(notes) == 1 and "1e+09 capped at 1100" in notes[0] and "federation.max_weight" in notes[0]
    # through the round's aggregation, with the note for the metrics record
    ups = [(s, n) for s, n in zip(states(1, 1, 1, 100), [100, 100, 100, 1e9])]
    strategy = make_strategy("fedavg", None, 0.9, Aggregator("mean", max_weight=10))
    new, aggregated, note = aggregate(strategy, ZERO, ups, min_replies=1)
    assert aggregated and "capped at 1000" in note
    assert new["w"].item() == pytest.approx((300 + 100 * 1000) / 1300)  # not ~100: the claim does not own it
    plain = FedAvg().aggregate(ZERO, ups)["w"].item()
    assert plain == pytest.approx(100, rel=1e-5)  # uncapped, the claim owned the average


def test_the_aggregator_options_are_validated_with_the_allowed_values():
    for override, match in [("federation.aggregator=norm_bound", "federation.norm_bound"),
                            ("federation.trim_fraction=0.5", "federation.trim_fraction"),
                            ("federation.max_weight=0.5", "federation.max_weight"),
                            ("federation.aggregator=kruum", "Did you mean 'krum'"),
                            ("federation.aggregator=krum", "Krum needs clients_per_round")]:
        with pytest.raises(cfg.ConfigError, match=match):
            cfg.load(None, [override, "federation.krum_f=2"] if "krum" in override else [override])
