"""Client-level DP (fedtune.privacy): clipping, the noise's std, the accountant against dp-accounting itself,
adaptive clipping, the config checks, and one run end to end on tiny-llama."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from fedtune import config as cfg
from fedtune import privacy
from fedtune.privacy import ClientDP, clip_rows, privatize_update
from fedtune.rounds import aggregate
from fedtune.strategies import FedAvg


def dp(mode="central", **kw) -> ClientDP:
    args = dict(clip=0.5, noise_multiplier=0.0, clients_per_round=4, num_clients=8, delta=1e-5, seed=0)
    args.update(kw)
    return ClientDP(mode, **args)


def states(n, d=6, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    glob = {"a": torch.randn(d, generator=g), "b": torch.randn(2, 3, generator=g)}
    return glob, [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in glob.items()} for _ in range(n)]


def flat(state):
    return torch.cat([state[k].reshape(-1) for k in ("a", "b")])


def test_clipping_bounds_every_update_and_leaves_small_ones_alone():
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4], [-6.0, 8.0]])
    clipped, norms = clip_rows(rows, 1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.5, 10.0])
    torch.testing.assert_close(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [-0.6, 0.8]]))
    # Central DP without noise: the new global state is global + mean of the clipped updates (divided by m = 4).
    glob, ups = states(3, scale=5.0)
    mech = dp(clip=0.5)
    new = mech.combine(glob, ups)
    by_hand = sum(d * min(1.0, 0.5 / float(d.norm())) for d in (flat(u) - flat(glob) for u in ups)) / 4
    torch.testing.assert_close(flat(new) - flat(glob), by_hand)
    assert mech.take() == {"dp_clip": 0.5, "dp_clipped": 3} and mech.take() == {}
    # A client's own clipping (local DP, no noise): its update's norm is at most C.
    out = privatize_update(glob, ups[0], clip=0.5, std=0.0, generator=None)
    assert float((flat(out) - flat(glob)).norm()) == pytest.approx(0.5, rel=1e-5)


def test_the_central_noise_has_std_z_times_c_on_the_sum():
    d = 100_000
    glob = {"a": torch.zeros(d), "b": torch.zeros(0)}
    mech = dp(clip=0.5, noise_multiplier=2.0, clients_per_round=4)
    new = mech.combine(glob, [glob] * 4)  # zero updates: the mean is the noise / m alone
    noise_on_sum = new["a"] * 4
    assert float(noise_on_sum.std()) == pytest.approx(2.0 * 0.5, rel=0.01)
    assert abs(float(noise_on_sum.mean())) < 0.01
    # Another round draws other noise; the same seed and round draw the same.
    again = dp(clip=0.5, noise_multiplier=2.0, clients_per_round=4).combine(glob, [glob] * 4)
    torch.testing.assert_close(again["a"], new["a"])
    assert not torch.equal(mech.combine(glob, [glob] * 4)["a"], new["a"])


def test_local_shares_add_up_to_the_central_std():
    d, m, z, c = 100_000, 4, 2.0, 0.5
    glob = {"a": torch.zeros(d)}
    g = torch.Generator().manual_seed(1)
    shares = [privatize_update(glob, glob, clip=c, std=z * c / math.sqrt(m), generator=g)["a"] for _ in range(m)]
    assert float(shares[0].std()) == pytest.approx(z * c / math.sqrt(m), rel=0.01)
    assert float(sum(shares).std()) == pytest.approx(z * c, rel=0.01)


def test_local_dp_clients_clip_their_own_update_and_add_their_share():
    from fedtune import registry
    from fedtune.grid import FunctionApp
    from fedtune.wire import Message

    def train(msg):
        return Message({"a": msg.tensors["a"] + 3.0}, {"kind": "fit_res", "num_examples": 1})

    sets = ["privacy.dp=local", "privacy.clip=0.5", "federation.num_clients=3", "federation.clients_per_round=3"]
    quiet = registry.wrap_clients(cfg.load(None, [*sets, "privacy.noise_multiplier=0"]), {n: FunctionApp(train) for n in range(3)})
    reply = quiet[1](Message({"a": torch.zeros(4)}, {"kind": "fit_ins", "round": 1, "dst": 1}))
    torch.testing.assert_close(reply.tensors["a"], torch.full((4,), 0.25))  # (3, 3, 3, 3) clipped to norm 0.5
    noisy = registry.wrap_clients(cfg.load(None, [*sets, "privacy.noise_multiplier=2"]), {0: FunctionApp(train)})
    out = noisy[0](Message({"a": torch.zeros(100_000)}, {"kind": "fit_ins", "round": 1, "dst": 0})).tensors["a"]
    clipped = 0.5 / math.sqrt(100_000)
    assert float((out - clipped).std()) == pytest.approx(2 * 0.5 / math.sqrt(3), rel=0.02)


def independent_epsilon(z, q, rounds, delta):
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds))
    return accountant.get_epsilon(delta)


def test_epsilon_is_dp_accountings_value_and_grows_with_rounds():
    values = [privacy.epsilon(1.1, 1.0, r, 1e-5) for r in (1, 2, 5, 20)]
    for r, eps in zip((1, 2, 5, 20), values):
        assert eps == pytest.approx(independent_epsilon(1.1, 1.0, r, 1e-5), rel=1e-9)
    assert values == sorted(values) and values[0] < values[-1]
    assert privacy.epsilon(1.1, 1.0, 0, 1e-5) == 0.0
    assert privacy.epsilon(0.0, 1.0, 3, 1e-5) == math.inf
    # What a run reports after its rounds: 2 rounds of z = 1.1 with 4 of 8 clients sampled.
    mech = dp(noise_multiplier=1.1)
    glob, ups = states(4)
    for _ in range(2):
        mech.combine(glob, ups)
    spent = mech.spent()
    assert spent["epsilon"] == pytest.approx(independent_epsilon(1.1, 0.5, 2, 1e-5), rel=1e-9)
    assert spent["delta"] == 1e-5


def test_target_epsilon_calibrates_the_noise_multiplier():
    z = privacy.calibrate(4.0, 1.0, 3, 1e-5)
    assert independent_epsilon(z, 1.0, 3, 1e-5) == pytest.approx(4.0, abs=2e-3)
    assert independent_epsilon(z * 0.95, 1.0, 3, 1e-5) > 4.0


def test_adaptive_clipping_follows_the_target_quantile():
    # No noise: C moves by exp(-lr * (unclipped fraction - target)); 1 of 4 updates is within C = 0.1.
    mech = dp(clip=0.1, adaptive=True, clients_per_round=4)
    glob = {"a": torch.zeros(2), "b": torch.zeros(0)}
    ups = [{"a": torch.tensor([n, 0.0]), "b": torch.zeros(0)} for n in (0.05, 0.2, 0.3, 0.4)]
    mech.combine(glob, ups)
    assert mech.clip == pytest.approx(0.1 * math.exp(-0.2 * (0.25 - 0.5)))
    # With noise, the updates' multiplier is lowered so that the two releases cost z (Flower's formula).
    assert privacy.update_noise_multiplier(0.5, 0.5) == pytest.approx((0.5 ** -2 - 1.0 ** -2) ** -0.5)
    with pytest.raises(ValueError, match="count_noise"):
        privacy.update_noise_multiplier(1.0, 0.5)


def test_the_shared_aggregation_takes_the_private_mean():
    glob, ups = states(3, scale=5.0)
    mech, twin = dp(noise_multiplier=1.0), dp(noise_multiplier=1.0)
    new, aggregated, _ = aggregate(FedAvg(), glob, [(u, 10.0 ** i) for i, u in enumerate(ups)], min_replies=1,
                                   privacy=mech)
    assert aggregated and mech.rounds == 1
    # The example counts do not weigh: the private mean is unweighted, over m = clients_per_round.
    torch.testing.assert_close(new, twin.combine(glob, ups))


@pytest.mark.parametrize("sets, match", [
    (["federation.paradigm=kd"], "averages client updates"),
    (["federation.aggregator=median"], "federation.aggregator=mean"),
    (["privacy.adaptive=true", "privacy.dp=local"], "needs privacy.dp=central"),
    (["privacy.clip=0"], "privacy.clip"),
    (["privacy.delta=1.5"], "privacy.delta"),
    (["privacy.dp=local", "runtime.batch_clients=2"], "batch_clients"),
    (["privacy.adaptive=true", "privacy.noise_multiplier=2"], "count_noise"),
])
def test_bad_privacy_settings_are_refused_naming_the_field(sets, match):
    with pytest.raises(cfg.ConfigError, match=match):
        cfg.load(None, ["privacy.dp=central", *sets])


def test_a_private_run_reports_epsilon_in_every_evaluation_and_the_summary(tmp_path, one_thread):
    from fedtune import experiment

    c = cfg.load(None, ["name=dp", "model.name=tiny-llama", "data.demo_train_size=24", "data.demo_test_size=6",
                        "federation.num_clients=3", "federation.clients_per_round=2", "federation.rounds=2",
                        "train.local_steps=1", "train.batch_size=4", "train.count_flops=false", "eval.base=false",
                        "privacy.dp=central", "privacy.noise_multiplier=1.5", "privacy.clip=0.05"])
    summary = experiment.run(c, out=tmp_path, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["round"] for r in evals] == [1, 2]
    for r in evals:
        assert r["epsilon"] == pytest.approx(independent_epsilon(1.5, 2 / 3, r["round"], 1e-5), rel=1e-9)
        assert r["delta"] == 1e-5
    assert evals[0]["epsilon"] < evals[1]["epsilon"] == summary["epsilon"]
    assert [r["dp_clip"] for r in records if r["type"] == "round"] == [0.05, 0.05]
    assert json.loads((tmp_path / "summary.json").read_text())["delta"] == 1e-5
