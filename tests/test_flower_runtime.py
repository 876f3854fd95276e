"""The Flower runtime's own logic in one process: client-id discovery, routing, failures, packing, data-path.

A stand-in for Flower's ServerApp grid delivers each Flower message to the real ClientApp handler
(`flower._client_reply`) with a Flower `Context` of that node's config; the network itself is covered
by tests/test_deploy_flower.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fedtune import config as cfg
from fedtune import experiment
from fedtune.data.demo import make_demo_task
from fedtune.paradigms import kd
from fedtune.runtime import flower
from fedtune.wire import Message, WireError, encode

SMALL = ["model.name=tiny-llama", "data.demo_train_size=60", "data.demo_test_size=8", "federation.num_clients=3",
         "federation.clients_per_round=2", "federation.rounds=2", "train.local_steps=2", "train.batch_size=4",
         "train.lr=0.01", "train.count_flops=false", "eval.max_examples=8", "eval.base=false"]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower stamps messages with the identity of the process they are made in (set by its runtime)."""
    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


class FakeFlowerGrid:
    """Flower's ServerApp grid, minus the network: delivers to the real client handler, per node config."""

    def __init__(self, nodes: dict[int, dict], silent: set[int] = frozenset()) -> None:
        self.nodes, self.silent = nodes, silent
        self.states: dict[int, RecordDict] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node in self.silent and m.metadata.message_type == "train":
                continue  # said hello, then went quiet: the server's timeout runs out
            ctx = Context(run_id=1, node_id=node, node_config=self.nodes[node],
                          state=self.states.setdefault(node, RecordDict()), run_config={})
            replies.append(flower._client_reply(m, ctx))
        return replies


# Flower node ids are large random numbers, in no relation to the partitions.
NODES = {9_000_000_017: {"partition-id": 2}, 12: {"partition-id": 0}, 7_777_777: {"partition-id": 1},
         5: {"no-id": 1}}  # the last one never says which client it is: it is left out


def out_of_memory(msg):
    raise RuntimeError("client ran out of memory")


def flower_factory(monkeypatch, silent=frozenset(), broken=None):
    """A grid factory whose clients are the paradigm's own apps, reached through Flower messages."""

    def factory(ctx, paradigm):
        apps = paradigm.make_clients(ctx)
        if broken is not None:
            apps[broken] = out_of_memory
        monkeypatch.setattr(flower, "client_for",
                            lambda config_yaml, node_config, run_id: apps[int(node_config["partition-id"])])
        return flower.FlowerGrid(FakeFlowerGrid(NODES, silent), ctx.config, flower.FlowerSettings(connect_timeout=1))

    return factory


def adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_clients_are_found_by_partition_id_and_the_run_equals_the_local_one(tiny, tmp_path, monkeypatch):
    c = cfg.load(None, SMALL)
    experiment.run(c, tmp_path / "local", quiet=True)
    experiment.run(c, tmp_path / "flower", quiet=True, grid_factory=flower_factory(monkeypatch))
    ref, got = adapter(tmp_path / "local"), adapter(tmp_path / "flower")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0)
    sampled = lambda run: [(r["round"], r["client"], r["status"]) for r in records(run) if r["type"] == "client"]
    assert sampled(tmp_path / "flower") == sampled(tmp_path / "local")  # same seeded sampling of partitions


def test_silent_and_failing_nodes_drop_out_of_the_round(tiny, tmp_path, monkeypatch):
    c = cfg.load(None, SMALL + ["federation.clients_per_round=3", "federation.rounds=1"])
    silent = {n for n, conf in NODES.items() if conf.get("partition-id") == 2}
    experiment.run(c, tmp_path / "r", quiet=True, grid_factory=flower_factory(monkeypatch, silent, broken=1))
    by_client = {r["client"]: r for r in records(tmp_path / "r") if r["type"] == "client"}
    assert by_client[0]["status"] == "ok"
    assert by_client[1]["status"] == "failed" and "client ran out of memory" in by_client[1]["error"]
    assert by_client[2]["status"] == "failed" and "no reply" in by_client[2]["error"]
    (rnd,) = [r for r in records(tmp_path / "r") if r["type"] == "round"]
    assert (rnd["replies"], rnd["failed"], rnd["aggregated"]) == (1, 2, True)


def test_payloads_are_wire_bytes_and_are_checked():
    msg = Message({"w": torch.arange(6.0).reshape(2, 3)}, {"kind": "fit_ins", "round": 1})
    content = flower.pack(msg, "name: x\n")
    assert content["fedtune"]["message"].data == encode(msg)  # the wire bytes, as they are
    back, config_yaml = flower.unpack(content)
    assert torch.equal(back.tensors["w"], msg.tensors["w"]) and back.meta == msg.meta and config_yaml == "name: x\n"
    with pytest.raises(WireError, match="over the limit"):
        flower.unpack(content, max_bytes=100)
    content["fedtune"]["message"].stype = "numpy.ndarray"
    with pytest.raises(WireError, match="stype"):
        flower.unpack(content)


def test_data_path_client_trains_on_exactly_its_file(tiny, tmp_path):
    _, tok = tiny
    rows = make_demo_task(seed=7, n_train=10, n_test=1)[0]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = cfg.load(None, SMALL)
    data = flower.own_data(c, tok, str(path), node=2)
    task = experiment.build_task(c.data, tok)
    assert data.train == [task.encode(r, "label") for r in rows]
    assert data.parts[2] == list(range(10)) and data.test == []
    with pytest.raises(ValueError, match="partition-id"):
        flower.partition_id({"data-path": str(path)})


def test_kd_clients_keep_their_own_adapter_between_messages_in_flowers_node_state(tiny, tmp_path, monkeypatch):
    """Flower runs every message in a fresh process: a KD client's private adapter must come back from Context.state."""
    c = cfg.load(None, SMALL + ["federation.paradigm=kd", "kd.public_fraction=0.3", "kd.public_size=8",
                                "kd.server_steps=1", "kd.distill_steps=1", "federation.clients_per_round=3"])
    experiment.run(c, tmp_path / "local", quiet=True)

    def factory(ctx, paradigm):
        init = paradigm.make_clients(ctx)  # built now, like each node's process builds them from a fresh adapter
        # A new client object for every message, as in a new process; only Flower's node state carries over.
        def fresh_client(config_yaml, node_config, run_id):
            k = int(node_config["partition-id"])
            return kd.KDClient(k, ctx.model, init[k].examples, init[k].public, init[k].settings, init[0].state,
                                     distill_steps=init[k].distill_steps, device=ctx.device, pad_id=ctx.pad_id,
                                     seed=c.seed)

        monkeypatch.setattr(flower, "client_for", fresh_client)
        return flower.FlowerGrid(FakeFlowerGrid(NODES), ctx.config, flower.FlowerSettings(connect_timeout=1))

    experiment.run(c, tmp_path / "flower", quiet=True, grid_factory=factory)
    ref, got = adapter(tmp_path / "local"), adapter(tmp_path / "flower")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0)


def test_a_node_with_its_own_config_refuses_another_experiment(tmp_path, monkeypatch):
    agreed = cfg.load(None, SMALL)
    (tmp_path / "mine.yaml").write_text(cfg.to_yaml(agreed))
    monkeypatch.setattr(flower, "client_for", lambda config_yaml, node_config, run_id: lambda m: Message({}, {"kind": "ok"}))
    ctx = Context(run_id=1, node_id=3, state=RecordDict(), run_config={},
                  node_config={"partition-id": 0, "config": str(tmp_path / "mine.yaml")})
    fit = Message({}, {"kind": "fit_ins", "round": 1, "dst": 0})
    assert flower.handle(fit, cfg.to_yaml(agreed), ctx).kind == "ok"
    changed = cfg.to_yaml(cfg.load(None, SMALL + ["train.lr=0.5", "model.name=smollm2-135m-instruct"]))
    with pytest.raises(ValueError, match=r"differs .* in model.name, train.lr: refusing"):
        flower.handle(fit, changed, ctx)


def test_split_runs_on_flower_only_with_a_split_server_and_waits_for_a_whole_client_round(monkeypatch):
    split = cfg.load(None, SMALL + ["federation.paradigm=split"])
    with pytest.raises(ValueError, match=r"runtime\.split_server set"):
        flower.check_runnable(split)
    flower.check_runnable(cfg.load(None, SMALL + ["federation.paradigm=split", "runtime.split_server=h:1"]))
    with pytest.raises(ValueError, match="centralized"):
        flower.check_runnable(cfg.load(None, SMALL + ["federation.paradigm=centralized"]))

    from fedtune.runtime.split_auth import SESSION_TIMEOUT_S

    settings = flower.FlowerSettings.from_run_config({"reply-timeout": 30, "split-round-timeout": 900})
    assert flower.FlowerSettings().split_round_timeout == SESSION_TIMEOUT_S  # the split stream's own deadline
    sent = []

    class Recorder(FakeFlowerGrid):
        def send_and_receive(self, messages, *, timeout=None):
            sent.append((timeout, [m.metadata.ttl for m in messages]))
            return super().send_and_receive(messages, timeout=timeout)

    grid = flower.FlowerGrid(Recorder({12: {"partition-id": 0}}), split, dataclasses.replace(settings,
                             connect_timeout=1))
    monkeypatch.setattr(flower, "client_for", lambda config_yaml, node_config, run_id: lambda m: Message({}, {"kind": "x"}))
    grid.send_and_receive([Message({}, {"kind": "split_fit_ins", "dst": 0})])
    grid.send_and_receive([Message({}, {"kind": "fit_ins", "dst": 0})], timeout=5)
    # hello; then a split run's calls wait a whole client round (Paradigm.long_exchanges), unless a call says otherwise
    assert sent == [(30, [30]), (900, [900]), (5, [5])]
    fedllm = flower.FlowerGrid(Recorder({12: {"partition-id": 0}}), cfg.load(None, SMALL),
                               dataclasses.replace(settings, connect_timeout=1))
    fedllm.send_and_receive([Message({}, {"kind": "fit_ins", "dst": 0})])
    assert sent[-1] == (30, [30])  # an ordinary paradigm's calls wait reply-timeout
    with pytest.raises(ValueError, match="split-round-timeout"):
        flower.FlowerSettings.from_run_config({"split-round-timeout": 0})


def test_a_long_lived_process_builds_a_client_once_per_run(monkeypatch):
    """flower_worker serves every message of a node from one process: the client is reused within a run only."""
    built = []

    class Model:
        unloaded = False

        def unload(self):
            self.unloaded = True

    class Ctx:
        def __init__(self):
            self.model, self.closed = Model(), False

        def close(self):
            self.closed = True

    def build(config_yaml, node_config):
        ctx = Ctx()
        built.append((object(), ctx))
        return built[-1]

    monkeypatch.setattr(flower, "build_client", build)
    monkeypatch.setattr(flower, "_NODE", flower.NodeClient())
    node = {"partition-id": 1, "num-partitions": 2}
    first = flower.client_for("a: 1\n", node, 7)
    assert flower.client_for("a: 1\n", dict(node), 7) is first and len(built) == 1  # the next round of run 7
    second = flower.client_for("a: 1\n", node, 8)  # a new run with the same config: a fresh client
    assert second is not first and len(built) == 2 and built[0][1].model.unloaded and built[0][1].closed
    assert flower.client_for("a: 2\n", node, 8) is not second and built[1][1].model.unloaded  # another config


def test_the_worker_ignores_a_sigint_while_a_task_runs_and_stops_on_one_when_idle():
    """flwr stops a task by signalling its process; in the long-lived worker that must not end later tasks."""
    from fedtune.runtime import flower_worker as worker

    worker._track(+1)
    try:
        worker._on_sigint(2, None)  # a task runs: logged and ignored
    finally:
        worker._track(-1)
    with pytest.raises(KeyboardInterrupt):
        worker._on_sigint(2, None)  # idle: stops as Ctrl-C does
