"""Multi-process simulation (runtime/distributed.py) on the CPU with gloo, 2 processes, tiny-llama.

The reference for every result is the one-process local runtime on the same config and seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fedtune import config as cfg
from fedtune import experiment
from fedtune import launch
from fedtune.runtime import distributed
from fedtune.runtime import free_port
from fedtune.rounds import ServerHooks

# One thread in this process, as each of the 2 worker processes gets (an equal share of 2 cores, or
# OMP_NUM_THREADS=1): the same float reduction order, which the 1e-6 comparisons need.
pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread", "fresh_bases")]


@pytest.fixture()
def fresh_bases():
    """Each test's in-process run loads its base model afresh, as the spawned ranks do: a cached base that an
    earlier test in this process used (and perhaps left changed in its last bits) must not enter a 1e-6
    comparison with processes that loaded their own."""
    from fedtune import models

    saved = dict(models._CACHE)
    models._CACHE.clear()
    yield
    models._CACHE.clear()
    models._CACHE.update(saved)

SMALL = ["model.name=tiny-llama", "model.device=cpu", "data.demo_train_size=60", "data.demo_test_size=12",
         "federation.num_clients=4", "federation.clients_per_round=3", "federation.rounds=2", "train.local_steps=2",
         "train.batch_size=4", "train.lr=0.01", "eval.base=false", "train.count_flops=false",
         "kd.public_size=8", "kd.distill_steps=1", "kd.server_steps=1"]
REPO = Path(__file__).resolve().parents[1]


def _records(path: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def assert_same_run(one: Path, many: Path) -> None:
    """Same global adapter (1e-6), accuracies, statuses, examples and bytes as the one-process run."""
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(many / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert _records(one, "eval") == _records(many, "eval")
    ca, cb = _records(one, "client"), _records(many, "client")
    assert [(r["round"], r["client"], r["status"], r["bytes_down"]) for r in ca] == \
           [(r["round"], r["client"], r["status"], r["bytes_down"]) for r in cb]
    for ra, rb in zip(ca, cb):
        assert ra["num_examples"] == rb["num_examples"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)
        # A reply's metadata carries the client's measured wall time, whose decimal digits vary from run to
        # run (in one process too); the tensors, hence all but a few header bytes, are the same.
        assert abs(ra["bytes_up"] - rb["bytes_up"]) <= 24
    assert "world_size: 2" in (many / "config.resolved.yaml").read_text()


def test_two_spawned_processes_give_the_one_process_result(tmp_path):
    overrides = SMALL + ["federation.paradigm=fedpeft"]
    experiment.run(cfg.load(None, overrides), out=tmp_path / "one", quiet=True)
    summary = launch.run(cfg.load(None, overrides + ["runtime.world_size=2"]), out=tmp_path / "two", quiet=True)
    assert summary == json.loads((tmp_path / "two" / "summary.json").read_text())
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_torchrun_launch_gives_the_one_process_result(tmp_path):
    # KD here: its clients keep their own adapters between rounds, so each must stay on one rank.
    overrides = SMALL + ["federation.paradigm=kd"]
    experiment.run(cfg.load(None, overrides), out=tmp_path / "one", quiet=True)
    torchrun = Path(sys.executable).parent / "torchrun"
    sets = [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()),
                           "-m", "fedtune.cli", "run", *sets, "--out", str(tmp_path / "two"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two")


# --------------------------------------------------------------------------- a failing client on rank 1


def _toy_rank(rank: int, port: int, out: str) -> None:
    """Both ranks: toy clients; rank 0 runs FedLLM's round loop over a DistributedGrid, rank 1 serves."""
    import torch.distributed as dist

    from fedtune.paradigms import fedpeft
    from fedtune.progress import Bars
    from fedtune.strategies import FedAvg
    from fedtune.wire import Message

    def client(i: int):
        def app(msg: Message) -> Message:
            if i == 3:
                raise RuntimeError("client 3 ran out of memory")
            return Message({"w": msg.tensors["w"] + (i + 1)},
                           {"num_examples": i + 1, "rank": dist.get_rank(), "pid": os.getpid()})
        return app

    apps = {i: client(i) for i in range(4)}
    channel = distributed.init_rank(cfg.load(None, ["model.device=cpu"]), rank, rank, 2, "gloo",
                                    f"tcp://127.0.0.1:{port}")
    try:
        if rank == 1:
            (Path(out) / "served.json").write_text(json.dumps(distributed.serve_worker(apps, channel)))
            return
        log: list[dict] = []
        hooks = ServerHooks(evaluate=lambda s: 0.0, log=log.append, save=lambda s, r: None,
                                    bars=Bars(quiet=True))
        grid = distributed.DistributedGrid(apps, channel)
        ranks = [r.meta.get("rank") for r in grid.send_and_receive(
            [Message({"w": torch.zeros(3)}, {"kind": "fit_ins", "round": 0, "dst": n}) for n in range(4)])]
        # One message for two ranks: rank 1 gets an empty share and still takes part in the round.
        (single,) = grid.send_and_receive([Message({"w": torch.zeros(3)}, {"kind": "fit_ins", "round": 0, "dst": 2})])
        ranks.append(single.meta["rank"])
        final, _ = fedpeft.serve(grid, {"w": torch.zeros(3)}, FedAvg(), rounds=2, clients_per_round=4, seed=0,
                                 eval_every=1, hooks=hooks)
        channel.stop()
        (Path(out) / "server.json").write_text(json.dumps({"w": final["w"].tolist(), "log": log, "ranks": ranks}))
    finally:
        dist.destroy_process_group()


def test_client_failing_on_rank_1_is_dropped_from_the_round(tmp_path):
    mp.spawn(_toy_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    server = json.loads((tmp_path / "server.json").read_text())
    # The i-th message of a round runs on rank i % 2, so clients 1 and 3 run on rank 1.
    assert server["ranks"] == [0, 1, 0, None, 0]
    clients = [r for r in server["log"] if r["type"] == "client"]
    assert [(r["client"], r["status"]) for r in clients] == [(0, "ok"), (1, "ok"), (2, "ok"), (3, "failed")] * 2
    assert "client 3 ran out of memory" in clients[3]["error"]
    # FedAvg of the three good clients by hand: each adds (i + 1) and weighs i + 1 -> (1 + 4 + 9) / 6 per round.
    assert server["w"] == pytest.approx([2 * 14 / 6] * 3, abs=1e-6)
    assert [r["replies"] for r in server["log"] if r["type"] == "round"] == [3, 3]
    assert json.loads((tmp_path / "served.json").read_text()) == 4  # two probe rounds and two FedLLM rounds


# --------------------------------------------------------------------------- units and bad configs


def test_balance_deals_longest_first_to_the_least_loaded_rank():
    assert distributed.balance([1.0] * 5, 2) == [0, 1, 0, 1, 0]  # equal costs: round robin
    costs = [5.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    ranks = distributed.balance(costs, 2)
    loads = [sum(c for c, r in zip(costs, ranks) if r == k) for k in range(2)]
    assert loads == [5.0, 5.0]  # round robin would give 7 and 3
    assert distributed.balance([], 3) == []


def test_bundle_sends_a_shared_state_once_and_unbundles_private_copies():
    from fedtune.wire import Message, decode, encode

    shared = {"w": torch.arange(4.0)}
    msgs = [(0, Message(shared, {"dst": 5})), (1, Message({"w": torch.ones(4)}, {"dst": 6})),
            (2, Message(shared, {"dst": 7}))]
    bundles = distributed.bundle(msgs)
    assert [indices for indices, _ in bundles] == [[0, 2], [1]]
    out = [m for _, b in bundles for m in distributed.unbundle(decode(encode(b)))]
    assert [m.meta["dst"] for m in out] == [5, 7, 6]
    out[0].tensors["w"].add_(100)  # a client that scribbles on its input touches no one else's
    assert torch.equal(out[1].tensors["w"], torch.arange(4.0)) and torch.equal(shared["w"], torch.arange(4.0))


@pytest.mark.parametrize("payloads", [[], [b""], [b"a", b"", b"xyz" * 1000]])
def test_pack_unpack_round_trip(payloads):
    assert distributed.unpack(distributed.pack(payloads)) == payloads


@pytest.mark.parametrize("overrides, field", [
    (["runtime.world_size=4"], "runtime.world_size = 4 is more than federation.clients_per_round = 3"),
    (["runtime.world_size=2", "federation.paradigm=split"], "federation.paradigm = 'split'"),
    (["runtime.world_size=2", "runtime.backend=nccl"], "runtime.backend = 'nccl'"),
])
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(cfg.ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
        launch.run(cfg.load(None, SMALL + overrides), quiet=True)


def test_a_mistake_found_inside_the_processes_reads_as_in_one_process(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    bad = SMALL + ["runtime.world_size=2", f"data.source={missing}", "data.label_words=[pos, neg]"]
    with pytest.raises(ValueError, match=f"data file '{missing}' does not exist"):
        launch.run(cfg.load(None, bad), out=tmp_path / "run", quiet=True)


def test_torchrun_world_size_must_match_the_config(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.under_torchrun()
    with pytest.raises(cfg.ConfigError, match="runtime.world_size = 3 but torchrun started 2 processes"):
        launch.run(cfg.load(None, SMALL + ["runtime.world_size=3"]), quiet=True)
