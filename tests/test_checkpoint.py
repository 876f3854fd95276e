"""Server checkpoints: a run stopped after a round and started again ends as if never stopped (FedLLM, KD, split)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtune import checkpoint
from fedtune import config as cfg
from fedtune import experiment
from fedtune.paradigms import fedpeft, kd
from fedtune.strategies import FedAdam, FedAvgM
from fedtune.rounds import ServerHooks

# FedAvgM (a strategy with state) and 2 of 3 clients a round (a sampler whose state matters).
SMALL = ["name=ckpt", "model.name=tiny-llama", "data.demo_train_size=60", "data.demo_test_size=12",
         "federation.num_clients=3", "federation.clients_per_round=2", "federation.rounds=3",
         "federation.strategy=fedavgm", "federation.server_lr=1.0", "federation.server_momentum=0.5",
         "train.local_steps=2", "train.batch_size=4", "train.lr=0.01", "train.count_flops=false",
         "eval.max_examples=12"]
# KD: clients keep private adapters between rounds, the server an optimizer and the soft labels.
KD = [*SMALL, "federation.paradigm=kd", "kd.public_fraction=0.3", "kd.public_size=8", "kd.server_steps=2",
      "kd.distill_steps=2"]
# Split: the main server's top adapter and its AdamW state carry over, besides the bottom's FedAvgM buffers.
SPLIT = [*SMALL, "federation.paradigm=split", "data.max_length=48"]
PARADIGMS = {"fedpeft": SMALL, "kd": KD, "split": SPLIT}


def adapter(path):
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


class Crash(RuntimeError):
    pass


def test_strategy_state_round_trips():
    g = torch.Generator().manual_seed(0)
    glob = {"a": torch.randn(3, generator=g)}
    ups = [({"a": torch.randn(3, generator=g)}, 1.0) for _ in range(4)]
    for make in (lambda: FedAvgM(1.0, 0.9), lambda: FedAdam(0.1)):
        one, two = make(), make()
        one.aggregate(glob, ups[:2])
        two.load_state_dict(one.state_dict())
        torch.testing.assert_close(one.aggregate(glob, ups[2:]), two.aggregate(glob, ups[2:]))
    with pytest.raises(ValueError, match="no buffer 'velocity'"):
        FedAdam().load_state_dict({"velocity:a": torch.zeros(1)})


def crash_after_round_2(c, path, monkeypatch):
    """Run `c` into `path` and kill the server after round 2 is logged and evaluated, before its checkpoint."""
    save = ServerHooks.for_model

    def hooks_that_crash_in_round_2(ctx, load=None):
        hooks = save(ctx, load)
        saving = hooks.save

        def crash(state, rnd):  # round 2 is logged and evaluated, then the server dies before its checkpoint
            saving(state, rnd)
            if rnd == 2:
                raise Crash("server killed")

        hooks.save = crash
        return hooks

    with monkeypatch.context() as m:
        m.setattr(ServerHooks, "for_model", staticmethod(hooks_that_crash_in_round_2))
        with pytest.raises(Crash):
            experiment.run(c, path, quiet=True)
    assert [r["round"] for r in records(path) if r["type"] == "round"] == [1, 2]


@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_run_killed_after_round_1_resumes_to_the_uninterrupted_result(tiny, tmp_path, monkeypatch, paradigm):
    c = cfg.load(None, PARADIGMS[paradigm])
    whole = experiment.run(c, tmp_path / "whole", quiet=True)
    crash_after_round_2(c, tmp_path / "cut", monkeypatch)

    resumed = experiment.run(c, tmp_path / "cut", quiet=True)

    ref, got = adapter(tmp_path / "whole"), adapter(tmp_path / "cut")
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0)
    # Not trivially equal: training moved the adapter away from its initial state.
    assert any(float(ref[k].abs().max()) > 0 for k in ref if "lora_B" in k)
    # (bytes_up is left out: replies carry measured seconds, whose printed length varies run to run.)
    for k in ("accuracy_by_round", "base_accuracy", "bytes_down", "client_rounds"):
        assert resumed[k] == whole[k], k
    # The half-logged round 2 was cut away: every round and client record appears once, as in the whole run.
    key = lambda r: (r["type"], r.get("round"), r.get("client"), r.get("model"))
    cut_keys = [key(r) for r in records(tmp_path / "cut")]
    assert sorted(cut_keys, key=str) == sorted((key(r) for r in records(tmp_path / "whole")), key=str)
    assert len(cut_keys) == len(set(cut_keys))


@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_checkpoint_of_another_config_is_refused(tiny, tmp_path, paradigm):
    c = cfg.load(None, PARADIGMS[paradigm] + ["federation.rounds=1"])
    experiment.run(c, tmp_path / "r", quiet=True)
    other = cfg.load(None, PARADIGMS[paradigm] + ["federation.rounds=1", "train.lr=0.02"])
    with pytest.raises(ValueError, match="checkpoint of a different config"):
        experiment.run(other, tmp_path / "r", quiet=True)


def test_a_run_that_died_in_round_1_starts_over_without_duplicate_records(tiny, tmp_path, monkeypatch):
    c = cfg.load(None, SMALL + ["federation.rounds=1"])
    def die(self, *args, **kw):
        raise Crash("server killed while aggregating round 1")

    with monkeypatch.context() as m:
        m.setattr(FedAvgM, "aggregate", die)
        with pytest.raises(Crash):
            experiment.run(c, tmp_path / "r", quiet=True)
    assert [r["type"] for r in records(tmp_path / "r")] == ["eval", "client", "client"]  # base, round 1 half logged
    experiment.run(c, tmp_path / "r", quiet=True)
    keys = [(r["type"], r.get("round"), r.get("client")) for r in records(tmp_path / "r")]
    assert len(keys) == len(set(keys)) and ("round", 1, None) in keys
    assert keys.count(("eval", 0, None)) == 1  # one base evaluation, not one per attempt


def test_checkpoints_cover_the_paradigms_whose_state_the_server_holds():
    def on(*overrides):
        return checkpoint.enabled(cfg.load(None, [*SMALL, *overrides]))

    assert on() and on("federation.paradigm=fedprox") and on("federation.paradigm=kd")
    assert on("federation.paradigm=split")
    # The networked main server keeps the top adapter and its optimizer in its own process.
    assert not on("federation.paradigm=split", "runtime.split_server=localhost:50051")
    assert not on("federation.paradigm=centralized")  # its one client keeps an optimizer across rounds
    assert not on("runtime.checkpoint=false")


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=g) for _ in range(3)]

    def adamw():
        w = torch.nn.Parameter(torch.ones(4, 3))
        return w, torch.optim.AdamW([w], lr=0.1)

    def step(w, opt, grad):
        w.grad = grad.clone()
        opt.step()

    w1, one = adamw()
    for grad in grads[:2]:
        step(w1, one, grad)
    tensors, meta = checkpoint.optimizer_state(one)
    assert set(tensors) == {"0.step", "0.exp_avg", "0.exp_avg_sq"}
    ck = checkpoint.Checkpoint(tmp_path, cfg.load(None, SMALL))
    ck.save(2, {"optimizer": tensors}, {"optimizer": meta})  # through the file: tensors and JSON meta
    saved = ck.load()
    w2, two = adamw()
    w2.data.copy_(w1.data)
    checkpoint.load_optimizer_state(two, saved.tensors["optimizer"], saved.meta["optimizer"])
    before = w1.data.clone()
    step(w1, one, grads[2])
    step(w2, two, grads[2])
    torch.testing.assert_close(w2.data, w1.data, atol=0, rtol=0)
    # A fresh optimizer (what a restart without the state would use) takes another step.
    w3, fresh = adamw()
    w3.data.copy_(before)
    step(w3, fresh, grads[2])
    assert (w3.data - w1.data).abs().max() > 1e-3
    with pytest.raises(ValueError, match="parameter groups"):
        checkpoint.load_optimizer_state(torch.optim.AdamW([w3, torch.nn.Parameter(torch.ones(1))]), tensors, meta)


def test_a_client_store_gives_the_state_before_the_round_asked_for(tmp_path):
    store = checkpoint.ClientStore(tmp_path / "kd-clients" / "client-0.safetensors", cfg.load(None, KD))
    state = lambda v: {"lora_A": torch.full((2, 2), float(v))}
    assert store.before(1) is None  # nothing stored: the client starts from its initial adapter
    store.save(1, state(1), None)
    start = store.before(3)
    assert start[0] == 1 and torch.equal(start[1]["lora_A"], state(1)["lora_A"])
    store.save(3, state(3), start)  # the client trained round 3 from its round-1 adapter ...
    # ... the server died before checkpointing round 3 and redoes it: the client starts again from round 1.
    rnd, again = store.before(3)
    assert rnd == 1 and torch.equal(again["lora_A"], state(1)["lora_A"])
    rnd, later = store.before(5)
    assert rnd == 3 and torch.equal(later["lora_A"], state(3)["lora_A"])
    store.save(5, state(5), (rnd, later))  # only the start and the end are kept
    assert store.before(3) is None
    other = checkpoint.ClientStore(store.path, cfg.load(None, KD + ["train.lr=0.5"]))
    with pytest.raises(ValueError, match="different config"):
        other.before(6)


def test_kd_client_stores_are_emptied_when_a_run_starts_afresh(tmp_path):
    c = cfg.load(None, KD)
    ctx = types.SimpleNamespace(config=c, path=tmp_path)
    stale = tmp_path / "kd-clients" / "client-0.safetensors"
    stale.parent.mkdir()
    stale.write_bytes(b"an adapter of an earlier run")
    assert kd.client_store_dir(ctx) == tmp_path / "kd-clients" and not stale.exists()  # no checkpoint: afresh
    stale.parent.mkdir()
    stale.write_bytes(b"this run's adapter")
    checkpoint.Checkpoint(tmp_path, c).save(1, {}, {})
    assert kd.client_store_dir(ctx) == tmp_path / "kd-clients" and stale.exists()  # resuming: kept
    assert kd.client_store_dir(types.SimpleNamespace(config=c, path=Path("."))) is None  # a Flower node
    off = cfg.load(None, KD + ["runtime.checkpoint=false"])
    assert kd.client_store_dir(types.SimpleNamespace(config=off, path=tmp_path)) is None


def test_a_fresh_start_without_checkpointing_removes_the_folders_old_checkpoint(tiny, tmp_path):
    """Its metrics are overwritten, so a later checkpointed run must not resume the old rounds against them."""
    c = cfg.load(None, SMALL + ["federation.rounds=1"])
    experiment.run(c, tmp_path / "r", quiet=True)
    assert (tmp_path / "r" / checkpoint.FILE).exists()
    off = cfg.load(None, SMALL + ["federation.rounds=1", "runtime.checkpoint=false"])
    experiment.run(off, tmp_path / "r", quiet=True)
    assert not (tmp_path / "r" / checkpoint.FILE).exists()
    experiment.run(c, tmp_path / "r", quiet=True)  # starts over: round 1 logged once, in this run
    assert [r.get("round") for r in records(tmp_path / "r") if r["type"] == "round"] == [1]
