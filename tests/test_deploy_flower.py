"""The Flower runtime end to end: a real SuperLink and SuperNodes on 127.0.0.1, started with Flower's tools.

One federation serves the module: TLS on, SuperNode authentication on, two registered SuperNodes
(partitions 0 and 1) and one whose key was never registered. Each SuperNode runs with
``--isolation process`` and its ClientApp tasks go to one long-lived `fedtune.runtime.flower_worker`
process, which keeps the model loaded, so a round takes seconds (Flower's own polling: 3 s on each side)
instead of 15-50 s with a fresh ClientApp process per message. The default suite runs the refused node
and app, 2 FedLLM rounds, 2 KD rounds and a split round against the local runtime (~2 min); the server
restart, the killed SuperNode (it waits out a reply timeout) and the data-path run (its own federation)
take 30-105 s each depending on the machine's load and stay ``slow``: ``pytest -m deploy`` runs them all
(~4-5.5 min; timings in README.flower.md)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from fedtune import config as cfg
from fedtune import experiment
from fedtune.checkpoint import FILE as CHECKPOINT
from fedtune.grid import error_reply
from fedtune.progress import Bars
from fedtune.runtime.certs import make_certificates, make_node_key
from fedtune.runtime.flower_cluster import FLOWER_APP, LocalFederation
from fedtune.runtime.local import LocalGrid
from fedtune.runtime.split_auth import ENV as SPLIT_ENV
from fedtune.runtime.split_auth import FED_SERVER, node_identity
from fedtune.wire import decode

# Every process of the federation runs torch on one thread (OMP_NUM_THREADS=1 in `fed`); the local runs
# compared with them to 1e-6 must too, whatever the machine's core count (CI has 2).
pytestmark = [pytest.mark.deploy, pytest.mark.usefixtures("one_thread")]

TINY = ["model.name=tiny-llama", "data.demo_train_size=40", "data.demo_test_size=8", "federation.num_clients=2",
        "federation.clients_per_round=2", "train.local_steps=2", "train.batch_size=4", "train.lr=0.01",
        "train.count_flops=false", "eval.max_examples=8", "eval.base=false"]


def split_tokens(folder):
    """Bearer tokens for the split service: ``tokens.txt`` (the service's) and ``<identity>.token`` (each caller's)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = {ident: os.urandom(16).hex() for ident in (FED_SERVER, node_identity(0), node_identity(1))}
    for ident, token in tokens.items():
        (folder / f"{ident}.token").write_text(token + "\n")
    (folder / "tokens.txt").write_text("".join(f"{i} {t}\n" for i, t in tokens.items()))
    return folder / "tokens.txt"


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """Also gives every process the split service's credentials (TLS with the SuperLink's CA, a token each),
    as the ServerApp (fed server) and the ClientApps (split clients) read them from their environment."""
    work = tmp_path_factory.mktemp("flower")
    certs = make_certificates(work / "certs", ["127.0.0.1", "localhost"])
    keys = {name: make_node_key(work / "keys", name) for name in ("node0", "node1", "intruder")}
    tokens = split_tokens(work / "split")
    split_env = {SPLIT_ENV["ca"]: str(certs["ca_cert"]), SPLIT_ENV["token_file"]: str(tokens.parent / "{identity}.token"),
                 SPLIT_ENV["timeout"]: "120", "OMP_NUM_THREADS": "1"}
    federation = LocalFederation(work, tls=(certs["ca_cert"], certs["server_cert"], certs["server_key"]),
                                 node_auth=True, env=split_env)
    federation.certs, federation.split_tokens = certs, tokens
    try:
        federation.start_superlink()
        for name in ("node0", "node1"):
            federation.register(keys[name][1])
        for i, name in enumerate(("node0", "node1", "intruder")):
            federation.start_supernode(name, f"partition-id={i % 2} num-partitions=2", keys[name][0])
        yield federation
    finally:
        federation.close()


def write_config(path, overrides):
    c = cfg.load(None, TINY + overrides)
    path.write_text(cfg.to_yaml(c))
    return c, path


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_adapter(run, ref):
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert any(float(b[k].abs().max()) > 0 for k in b if "lora_B" in k)  # training really moved it


def checkpoint_round(run) -> int:
    path = run / CHECKPOINT
    return int(decode(path.read_bytes()).meta["round"]) if path.exists() else 0


def test_unregistered_supernode_is_refused(fed):
    fed.wait_for(lambda: fed.procs["intruder"].poll() is not None, 60, "the unregistered SuperNode to give up",
                 "intruder")
    assert fed.procs["intruder"].returncode != 0
    assert "Failed to activate SuperNode" in fed.log("intruder")


def test_the_worker_runs_no_other_flower_app(fed, tmp_path):
    """A run of another FAB (here the same components under another app name) gets error replies, not our code."""
    app = tmp_path / "other-app"
    app.mkdir()
    (app / "pyproject.toml").write_text((FLOWER_APP / "pyproject.toml").read_text().replace(
        'name = "fedtune-flower"', 'name = "other-app"'))
    _, path = write_config(tmp_path / "exp.yaml", ["name=flower-other-app", "federation.rounds=1"])
    fed.submit({"config": str(path), "out": str(tmp_path / "run"), "connect-timeout": 30.0}, app=app)
    refusal = "runs only fedtune's Flower app (fedtune/fedtune-flower), not 'fedtune/other-app'"
    fed.wait_for(lambda: refusal in fed.log("node0.worker") and refusal in fed.log("node1.worker"), 120,
                 "both workers to refuse the other app's task", "node0.worker")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_two_rounds_over_flower_equal_the_local_runtime(fed, tiny, tmp_path):
    c, path = write_config(tmp_path / "exp.yaml", ["name=flower-2", "federation.rounds=2"])
    experiment.run(c, tmp_path / "local", quiet=True)
    run = tmp_path / "flower"
    fed.submit({"config": str(path), "out": str(run), "connect-timeout": 60.0, "reply-timeout": 300.0})
    fed.wait_for(lambda: (run / "summary.json").exists(), 300, "the run to finish", "superlink")

    assert_same_adapter(run, tmp_path / "local")
    assert sorted((r["round"], r["client"], r["status"]) for r in records(run) if r["type"] == "client") == [
        (r, n, "ok") for r in (1, 2) for n in (0, 1)]
    local = json.loads((tmp_path / "local" / "summary.json").read_text())
    flower = json.loads((run / "summary.json").read_text())
    assert flower["accuracy_by_round"] == local["accuracy_by_round"]
    assert flower["bytes_down"] == local["bytes_down"]  # the same messages went out, counted the same way


@pytest.fixture()
def split_server(fed, tmp_path):
    """``fedtune split-server`` as its own process (TLS + tokens, one torch thread); yields a function that starts
    it for a config file and returns its host:port."""
    procs = []

    def start(config_path) -> str:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtune.cli", "split-server", "--config", str(config_path), "--host", "127.0.0.1",
             "--port", "0", "--tls-cert", str(fed.certs["server_cert"]), "--tls-key", str(fed.certs["server_key"]),
             "--token-file", str(fed.split_tokens)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs.append(proc)
        line = proc.stdout.readline()  # blocks until the service listens (or the process dies)
        match = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
        assert match, f"split-server did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        return match[1]

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_split_over_flower_and_the_split_server_equals_the_local_runtime(fed, split_server, tiny, tmp_path):
    """Flower carries split_fit_ins/fit_res and the FedAvg of the bottom adapters; the steps stream to the service."""
    c, path = write_config(tmp_path / "exp.yaml", ["name=flower-split", "federation.rounds=1",
                                                   "federation.paradigm=split", "data.max_length=32"])
    local = experiment.run(c, tmp_path / "local", quiet=True)
    address = split_server(path)
    _, remote_path = write_config(tmp_path / "remote.yaml", ["name=flower-split", "federation.rounds=1",
                                                             "federation.paradigm=split", "data.max_length=32",
                                                             f"runtime.split_server={address}"])
    run = tmp_path / "flower"
    fed.submit({"config": str(remote_path), "out": str(run), "connect-timeout": 60.0, "reply-timeout": 120.0,
                "split-round-timeout": 240.0})
    fed.wait_for(lambda: (run / "summary.json").exists(), 400, "the split run to finish", "superlink")

    a = load_file(str(tmp_path / "local" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    # tiny-llama has 2 layers cut after 1: layers.1 is the split server's top, the rest the clients' FedAvg'd bottom
    trained = {("top" if "layers.1." in k else "bottom") for k, v in b.items() if "lora_B" in k and v.abs().sum() > 0}
    assert trained == {"top", "bottom"}
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    flower = json.loads((run / "summary.json").read_text())
    assert flower["accuracy"] == pytest.approx(local["accuracy"], abs=1e-9)
    loc = {r["client"]: r for r in records(tmp_path / "local") if r["type"] == "client"}
    rem = {r["client"]: r for r in records(run) if r["type"] == "client"}
    assert sorted(rem) == [0, 1]
    for node, r in rem.items():
        assert r["status"] == "ok" and r["server_steps"] == loc[node]["server_steps"] == 2
        assert r["train_loss"] == pytest.approx(loc[node]["train_loss"], abs=1e-6)
        assert r["stream_bytes_up"] > 0 and r["stream_bytes_down"] > 0  # the steps went over the stream
        # the same messages as in process, plus the service's address and the stream byte counts in meta
        assert abs(r["bytes_up"] - loc[node]["bytes_up"]) < 512
        assert abs(r["bytes_down"] - loc[node]["bytes_down"]) < 512


def test_server_killed_after_round_1_resumes_and_equals_the_local_runtime(fed, tiny, tmp_path):
    c, path = write_config(tmp_path / "exp.yaml", ["name=flower-resume", "federation.rounds=3"])
    experiment.run(c, tmp_path / "local", quiet=True)
    run = tmp_path / "flower"
    settings = {"config": str(path), "out": str(run), "connect-timeout": 60.0, "reply-timeout": 120.0}

    fed.submit(settings)
    fed.wait_for(lambda: checkpoint_round(run) >= 1, 240, "round 1 over Flower", "superlink")
    assert fed.kill_serverapp() >= 1  # SIGKILL, mid-way through round 2
    stopped_at = checkpoint_round(run)
    assert stopped_at < 3 and not (run / "summary.json").exists()

    fed.submit(settings)  # the same command again: resumes after the last finished round
    fed.wait_for(lambda: (run / "summary.json").exists(), 300, "the resumed run to finish", "superlink")

    assert_same_adapter(run, tmp_path / "local")
    rounds = [r["round"] for r in records(run) if r["type"] == "round"]
    assert rounds == [1, 2, 3]  # no round logged twice
    clients = [(r["round"], r["client"]) for r in records(run) if r["type"] == "client"]
    assert sorted(clients) == [(r, n) for r in (1, 2, 3) for n in (0, 1)]
    assert all(r["status"] == "ok" for r in records(run) if r["type"] == "client")
    local = json.loads((tmp_path / "local" / "summary.json").read_text())
    flower = json.loads((run / "summary.json").read_text())
    assert flower["accuracy_by_round"] == local["accuracy_by_round"]
    assert flower["bytes_down"] == local["bytes_down"]


@pytest.mark.slow  # beyond the CI scenarios; opt-in to keep the suite well under 10 minutes
def test_kd_over_flower_equals_the_local_runtime(fed, tiny, tmp_path):
    """KD clients keep a private adapter between rounds: over Flower it lives in the node's Context.state."""
    c, path = write_config(tmp_path / "exp.yaml", ["name=flower-kd", "federation.rounds=2", "federation.paradigm=kd",
                                                   "kd.public_fraction=0.3", "kd.public_size=8", "kd.server_steps=1",
                                                   "kd.distill_steps=1"])
    experiment.run(c, tmp_path / "local", quiet=True)
    run = tmp_path / "flower"
    fed.submit({"config": str(path), "out": str(run), "connect-timeout": 60.0, "reply-timeout": 300.0})
    fed.wait_for(lambda: (run / "summary.json").exists(), 400, "the KD run to finish", "superlink")
    assert_same_adapter(run, tmp_path / "local")


@pytest.mark.slow  # four Flower round trips a round (~1 min); before the test that kills node 1
def test_secure_aggregation_over_flower_equals_the_local_runtime(fed, tiny, tmp_path):
    """Flower's SecAgg+ stages as fedtune messages over the real SuperLink; each node keeps its keys and shares in
    its Flower node state between stages. Masks cancel exactly and rounding is seeded: the adapter is the local one."""
    c, path = write_config(tmp_path / "exp.yaml", ["name=flower-secagg", "federation.rounds=1", "secagg.enabled=true"])
    experiment.run(c, tmp_path / "local", quiet=True)
    run = tmp_path / "flower"
    fed.submit({"config": str(path), "out": str(run), "connect-timeout": 60.0, "reply-timeout": 300.0})
    fed.wait_for(lambda: (run / "summary.json").exists(), 400, "the secure run to finish", "superlink")
    assert_same_adapter(run, tmp_path / "local")
    assert sorted((r["client"], r["status"]) for r in records(run) if r["type"] == "client") == [(0, "ok"), (1, "ok")]
    (sa,) = [r for r in records(run) if r["type"] == "secagg"]
    assert sa["summed"] == 2 and set(sa["stages"]) == {"setup", "share_keys", "collect_masked_vectors", "unmask"}


def test_supernode_killed_mid_round_drops_out_and_the_round_completes(fed, tiny, tmp_path):
    # 8 steps: node 1 is still building its client and training when it is killed (its worker is fast)
    c, path = write_config(tmp_path / "exp.yaml", ["name=flower-dropout", "federation.rounds=1",
                                                   "train.local_steps=8"])
    run = tmp_path / "flower"
    rid = fed.submit({"config": str(path), "out": str(run), "connect-timeout": 60.0, "reply-timeout": 30.0})

    def node1_training() -> bool:
        log = fed.log("node1")
        return f"[RUN {rid}]" in log and "Receiving: train message" in log[log.index(f"[RUN {rid}]"):]

    fed.wait_for(node1_training, 120, "node 1 to receive its round-1 message", "node1")
    fed.kill("node1")
    fed.wait_for(lambda: (run / "summary.json").exists(), 180, "the round to complete without node 1", "superlink")

    by_client = {r["client"]: r for r in records(run) if r["type"] == "client"}
    assert by_client[0]["status"] == "ok"
    assert by_client[1]["status"] == "failed" and "no reply" in by_client[1]["error"]
    (round_record,) = [r for r in records(run) if r["type"] == "round"]
    assert round_record["replies"] == 1 and round_record["failed"] == 1 and round_record["aggregated"]

    # Independently: the local runtime with client 1 failing gives the same global adapter.
    def without_node_1(ctx, paradigm):
        apps = paradigm.make_clients(ctx)
        apps[1] = lambda msg: error_reply(1, "killed")
        return LocalGrid(apps)

    experiment.run(c, tmp_path / "local", quiet=True, grid_factory=without_node_1)
    assert_same_adapter(run, tmp_path / "local")


@pytest.mark.slow  # beyond the CI scenarios; opt-in to keep the suite well under 10 minutes
def test_nodes_reading_only_their_own_files_train_on_those_files(tiny, tmp_path):
    """data-path: node k's file holds the rows of the *other* partition, so only reading the file reproduces
    the simulation with the partitions swapped (and not the plain simulation)."""
    c, path = write_config(tmp_path / "exp.yaml", ["name=flower-files", "federation.rounds=2"])
    _, tok = tiny
    rows = experiment._load(c.data, c.seed)[0]
    parts = experiment.prepare_data(c, tok, Bars(quiet=True)).parts
    swapped = parts[::-1]

    def swapped_partitions(ctx, paradigm):
        ctx = dataclasses.replace(ctx, data=dataclasses.replace(ctx.data, parts=swapped))
        return LocalGrid(paradigm.make_clients(ctx))

    experiment.run(c, tmp_path / "plain", quiet=True)
    experiment.run(c, tmp_path / "swapped", quiet=True, grid_factory=swapped_partitions)
    with pytest.raises(AssertionError):
        assert_same_adapter(tmp_path / "plain", tmp_path / "swapped")  # the two references differ
    run = tmp_path / "flower"
    with LocalFederation(tmp_path / "work", env={"OMP_NUM_THREADS": "1"}) as federation:  # as this process
        federation.start_superlink()
        for k, part in enumerate(swapped):
            mine = tmp_path / f"client{k}.jsonl"
            mine.write_text("".join(json.dumps(rows[j]) + "\n" for j in part))
            federation.start_supernode(f"node{k}", f"partition-id={k} data-path='{mine}'")
        federation.submit({"config": str(path), "out": str(run), "connect-timeout": 60.0, "reply-timeout": 300.0})
        federation.wait_for(lambda: (run / "summary.json").exists(), 300, "the run to finish", "superlink")
    assert_same_adapter(run, tmp_path / "swapped")
