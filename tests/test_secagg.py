"""Secure aggregation (fedtune.secagg): Flower's SecAgg+ run in process over fedtune's grid.

The protocol tests use small hand-made updates (no model): what the server receives looks nothing like a
client's update, the unmasked result is the example-weighted mean computed here by hand within the
quantization step, a client that drops after sharing its keys does not break the round (and more dropouts
than the threshold allows stop it cleanly), and the bytes are those of the encoded messages. The run tests
train the tiny model with and without secure aggregation, locally and through the Flower runtime.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.quantization import quantize
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fedtune import config as cfg
from fedtune import experiment
from fedtune.grid import FunctionApp
from fedtune.runtime.local import LocalGrid
from fedtune.secagg import SecAggClient, SecAggConfig, resolved_shares
from fedtune.secagg_server import SecAggServer
from fedtune.strategies import FedAvg
from fedtune.wire import Message, encode

SHAPES = {"layer.0.lora_A": (8, 64), "layer.0.lora_B": (64, 8), "layer.1.bias": (4000,)}
W = 50  # secagg.max_num_examples in these tests
STEP = 2 * 1.0 / 2**22  # one quantization step at the default clipping_range 1.0 and quantization_range 2**22


def make_updates(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    global_state = {k: 0.05 * torch.randn(s, generator=g) for k, s in SHAPES.items()}
    states = {i: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in global_state.items()} for i in range(n)}
    counts = {i: 10 * (i + 1) for i in range(n)}  # 10 .. 50 examples: unequal weights
    return global_state, states, counts


class RecordingGrid(LocalGrid):
    """The local grid, keeping the encoded bytes of every message and of every reply the server receives."""

    def __init__(self, apps):
        super().__init__(apps)
        self.sent: list[tuple[int, bytes]] = []
        self.received: list[tuple[int, bytes]] = []

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        self.sent += [(int(m.meta["dst"]), encode(m)) for m in messages]
        self.received += [(int(m.meta["dst"]), encode(r)) for m, r in zip(messages, replies)]
        return replies


def clients(states, counts, drop=()):
    def app(i):
        def fit(msg):
            if i in drop:  # after setup and key sharing: the collect stage is where the client trains
                raise RuntimeError(f"client {i} lost its connection")
            return Message(states[i], {"kind": "fit_res", "num_examples": counts[i], "train_loss": 0.25})
        return SecAggClient(FunctionApp(fit), i, seed=0)
    return {i: app(i) for i in states}


def secure_round(n=5, drop=(), cfg_kw=None):
    global_state, states, counts = make_updates(n)
    grid = RecordingGrid(clients(states, counts, drop))
    server = SecAggServer(SecAggConfig(enabled=True, **(cfg_kw or {})), max_num_examples=W)
    records = []
    new, summed, aggregated, note = server.round(grid, 1, list(states), global_state, FedAvg(), log=records.append)
    return global_state, states, counts, new, summed, aggregated, note, records, server, grid


def by_hand(global_state, states, counts, alive):
    """The weighted mean with Flower's weights: round(min(n, W) / W * 2**22) / 2**22, in float64."""
    w = {i: round(min(counts[i], W) / W * 2**22) / 2**22 for i in alive}
    total = sum(w.values())
    return {k: global_state[k].double() + sum(w[i] * (states[i][k].double() - global_state[k].double()) for i in alive)
            / total for k in global_state}, total


def test_the_unmasked_result_is_the_weighted_mean_within_the_quantization_step():
    g, states, counts, new, summed, aggregated, note, records, _, _ = secure_round()
    assert (summed, aggregated, note) == (5, True, "")
    expect, total = by_hand(g, states, counts, range(5))
    bound = 5 * STEP / total  # each client's stochastic rounding is off by less than one step
    unweighted = {k: sum(states[i][k] for i in range(5)) / 5 for k in g}
    for k in g:
        err = (new[k].double() - expect[k]).abs().max().item()
        assert err <= bound, (k, err, bound)
        # The tolerance separates weightings: the unweighted mean is far outside it.
        assert (unweighted[k].double() - expect[k]).abs().max().item() > 100 * bound
    ok = [r for r in records if r["type"] == "client"]
    assert [(r["client"], r["status"], r["num_examples"], r["secagg_clipped"]) for r in ok] == \
        [(i, "ok", counts[i], 0) for i in range(5)]


def test_the_server_receives_only_masked_vectors():
    g, states, counts, _, _, _, _, _, server, grid = secure_round()
    received = b"".join(data for _, data in grid.received)
    for i in range(5):
        update = np.concatenate([(states[i][k] - g[k]).numpy().ravel() for k in sorted(g)]).astype(np.float64)
        masked = np.concatenate([a.ravel() for a in server.last.masked[i][1:]]).astype(np.float64)
        # What a client sends at the collect stage is uniform on [0, 2**32) and uncorrelated with its update ...
        assert abs(np.corrcoef(masked, update)[0, 1]) < 0.1
        assert 0.45 < masked.mean() / 2**32 < 0.55 and 0.45 < (masked >= 2**31).mean() < 0.55
        # ... while the same vector before masking (Flower's quantization of the weighted update) is the update.
        ratio = round(counts[i] / W * 2**22) / 2**22
        plain = np.concatenate([a.ravel() for a in quantize([update * ratio], 1.0, 2**22)]).astype(np.float64)
        assert np.corrcoef(plain, update)[0, 1] > 0.99
        # No reply carries the client's adapter values as they are.
        for k in g:
            assert states[i][k].numpy().tobytes()[:64] not in received


def test_a_client_dropped_after_sharing_its_keys_within_the_threshold_leaves_the_others_sum():
    assert resolved_shares(SecAggConfig(), 5) == (5, 3)  # 5 shares, 3 needed: 2 dropouts are tolerated
    g, states, counts, new, summed, aggregated, _, records, server, _ = secure_round(drop=(2,))
    assert (summed, aggregated) == (4, True)
    expect, total = by_hand(g, states, counts, [0, 1, 3, 4])
    for k in g:
        assert (new[k].double() - expect[k]).abs().max().item() <= 4 * STEP / total
    failed = {r["client"]: r for r in records if r["type"] == "client" and r["status"] == "failed"}
    assert list(failed) == [2] and "collect_masked_vectors" in failed[2]["error"]
    assert "lost its connection" in failed[2]["error"]
    (sa,) = [r for r in records if r["type"] == "secagg"]
    assert sa["stages"]["share_keys"]["replies"] == 5 and sa["stages"]["collect_masked_vectors"]["replies"] == 4


def test_more_dropouts_than_the_threshold_allows_keep_the_previous_global_state():
    g, _, _, new, summed, aggregated, note, records, _, _ = secure_round(drop=(0, 1, 2))
    assert (summed, aggregated) == (0, False) and "did not complete" in note
    assert all(torch.equal(new[k], g[k]) for k in g)
    assert all(r["status"] == "failed" for r in records if r["type"] == "client")


def test_bytes_are_the_encoded_messages_and_a_masked_vector_is_int64():
    g, _, _, _, _, _, _, records, server, grid = secure_round()
    for i in range(5):
        rec = next(r for r in records if r["type"] == "client" and r["client"] == i)
        assert rec["bytes_down"] == sum(len(b) for d, b in grid.sent if d == i)
        assert rec["bytes_up"] == sum(len(b) for d, b in grid.received if d == i)
        # Flower's masked vector: the weight factor and one int64 array per tensor, as numpy's .npy bytes.
        blobs = [ndarray_to_bytes(a) for a in server.last.masked[i]]
        assert [len(b) for b in blobs] == [len(ndarray_to_bytes(np.zeros(s, np.int64))) for s in
                                           [(1,), *(SHAPES[k] for k in sorted(SHAPES))]]
    (sa,) = [r for r in records if r["type"] == "secagg"]
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    up = sa["stages"]["collect_masked_vectors"]["bytes_up"] / 5
    assert 8 * params < up < 8 * params + 4096  # int64 on the wire: twice the float32 update
    assert sum(s["bytes_up"] for s in sa["stages"].values()) == sum(len(b) for _, b in grid.received)


@pytest.mark.parametrize("override, field", [
    ("federation.aggregator=median", "federation.aggregator"),
    ("federation.aggregator=krum", "federation.aggregator"),
    ("federation.paradigm=kd", "secagg.enabled"),
    ("runtime.batch_clients=2", "runtime.batch_clients"),
    ("runtime.world_size=2", "runtime.world_size"),
    ("secagg.num_shares=7", "secagg.num_shares"),
    ("secagg.reconstruction_threshold=6", "secagg.reconstruction_threshold"),
    ("secagg.reconstruction_threshold=1", "secagg.reconstruction_threshold"),
    ("secagg.reconstruction_threshold=1.5", "secagg.reconstruction_threshold"),
    ("secagg.clipping_range=0", "secagg.clipping_range"),
    ("secagg.quantization_range=1000000000", "secagg.quantization_range"),
])
def test_configs_secure_aggregation_cannot_serve_are_refused_naming_the_field(override, field):
    base = ["federation.num_clients=5", "federation.clients_per_round=5", "secagg.enabled=true"]
    cfg.load(None, base)  # fine as it is
    with pytest.raises(cfg.ConfigError, match=field.replace(".", r"\.")):
        cfg.load(None, base + [override])


SMALL = ["model.name=tiny-llama", "data.demo_train_size=60", "data.demo_test_size=8", "federation.num_clients=3",
         "federation.clients_per_round=3", "federation.rounds=1", "train.local_steps=2", "train.batch_size=4",
         "train.lr=0.01", "train.count_flops=false", "eval.max_examples=8", "eval.base=false",
         "federation.paradigm=fedprox", "federation.prox_mu=0.01", "federation.strategy=fedavgm",
         "federation.max_weight=null"]


def adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_a_secure_run_ends_where_the_plain_run_does(tiny, tmp_path, one_thread, monkeypatch):
    """FedProx + FedAvgM, locally and over the Flower runtime (its ClientApp handler): secure = plain, within steps."""
    from test_flower_runtime import flower_factory

    plain = cfg.load(None, SMALL)
    secure = cfg.load(None, SMALL + ["secagg.enabled=true"])
    experiment.run(plain, tmp_path / "plain", quiet=True)
    experiment.run(secure, tmp_path / "secure", quiet=True)
    for attr in ("_run_id", "_task_id", "_node_id"):  # a Flower ServerApp process has its task identity
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    experiment.run(secure, tmp_path / "flower", quiet=True, grid_factory=flower_factory(monkeypatch))
    ref = adapter(tmp_path / "plain")
    for run in ("secure", "flower"):
        got = adapter(tmp_path / run)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=0)
    records = [json.loads(x) for x in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    assert [r["summed"] for r in records if r["type"] == "secagg"] == [3]
    assert any(not torch.equal(adapter(tmp_path / "plain")[k], adapter(tmp_path / "secure")[k]) for k in ref)


def test_secure_aggregation_with_differential_privacy_is_refused_by_name():
    from fedtune import config as cfg

    with pytest.raises(cfg.ConfigError, match=r"privacy.dp = 'central' with secagg.enabled"):
        cfg.load(None, ["model.name=tiny-llama", "secagg.enabled=true", "privacy.dp=central"])


@pytest.mark.parametrize("other", ["compression.kind=int8", "federation.strategy=scaffold"])
def test_secure_aggregation_refuses_compression_and_scaffold_by_name(other):
    with pytest.raises(cfg.ConfigError, match=r"with secagg.enabled = true is not supported"):
        cfg.load(None, ["model.name=tiny-llama", "secagg.enabled=true", "train.optimizer=sgd", other])


def test_differential_privacy_refuses_scaffold_by_name():
    with pytest.raises(cfg.ConfigError, match=r"federation.strategy = 'scaffold' is not supported"):
        cfg.load(None, ["model.name=tiny-llama", "privacy.dp=central", "federation.strategy=scaffold",
                        "train.optimizer=sgd"])
