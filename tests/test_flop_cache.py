"""FLOPs counted once per batch shape and reused equal FLOPs counted on every step.

FlopCounterMode costs more than a small model's step on a GPU, so every paradigm counts a block of
work once per key that fixes its shapes (`meter.FlopCache`). These tests run the same client rounds
with the cache and with every block counted (``FlopCache(every=True)``, or a plain `ComputeMeter`
around the whole round) and compare.
"""

from __future__ import annotations

import pytest
import torch

from fedtune import config as cfg
from fedtune.experiment import prepare_data
from fedtune.flops import FlopCache
from fedtune.meter import ComputeMeter
from fedtune.models import attach_lora
from fedtune.paradigms import fedpeft, split
from fedtune.progress import Bars
from fedtune.runtime.local import LocalGrid
from fedtune.split_model import CLIENT, Cut, MainServer
from fedtune.split_session import Activations, LocalMainServer
from fedtune.train.adapter import adapter_state, load_adapter_state
from fedtune.train.local_steps import TrainSettings
from fedtune.wire import Message

CPU = torch.device("cpu")
# Short prompts of varied lengths: several batch widths and target counts in a few steps.
SMALL = ["model.name=tiny-llama", "data.demo_train_size=48", "data.demo_test_size=8", "federation.num_clients=2",
         "federation.clients_per_round=2", "data.max_length=48", "eval.base=false"]


@pytest.fixture()
def setup(tiny):
    base, tok = tiny
    c = cfg.load(None, SMALL)
    data = prepare_data(c, tok, Bars(quiet=True))
    model = attach_lora(base, c.peft, c.seed)
    yield model, tok, data
    model.unload()


def settings(steps=4):
    return TrainSettings(local_steps=steps, local_epochs=None, batch_size=4, lr=0.01, count_flops=True,
                         cuda_graphs=False)


def test_the_cache_counts_a_key_once_and_adds_its_count_every_time():
    cache = FlopCache()
    a = torch.ones(8, 16)
    for _ in range(3):
        with cache.block(("mm", 8)):
            a @ a.T
    assert list(cache.per_key.values()) == [2 * 8 * 16 * 8] and cache.total == 3 * 2 * 8 * 16 * 8
    assert cache.take() == 3 * 2 * 8 * 16 * 8 and cache.total == 0
    off = FlopCache(enabled=False)
    with off.block("x"):
        a @ a.T
    assert off.total is None


def test_a_fedllm_client_round_counts_what_a_meter_around_every_step_counts(setup):
    model, tok, data = setup
    examples = [data.train[j] for j in data.parts[0]]
    init = adapter_state(model)
    client = fedpeft.FedPeftClient(0, model, examples, settings(6), device=CPU, pad_id=tok.pad_token_id, seed=0)
    cached = client(Message(init, {"round": 1})).meta["flops"]
    assert len(client.runner._eager_flops.per_key) < 6  # some step shapes repeat: the cache was used
    load_adapter_state(model, init)
    reference = fedpeft.FedPeftClient(0, model, examples, settings(6), device=CPU, pad_id=tok.pad_token_id, seed=0)
    reference.runner._eager_flops = FlopCache(every=True)
    meter = ComputeMeter(CPU, count_flops=True)
    with meter:
        reference(Message(init, {"round": 1}))
    assert cached == meter.flops > 0


@pytest.mark.parametrize("u_shaped", [False, True], ids=["standard", "u_shaped"])
def test_split_client_and_main_server_counts_equal_counting_every_step(setup, u_shaped):
    model, tok, data = setup
    cut = Cut(model, 1, u_shaped=u_shaped)
    want = Activations(torch.float32, model.config.hidden_size, model.config.vocab_size)
    init = cut.part(adapter_state(model), CLIENT)
    full = adapter_state(model)
    counts = {}
    for every in (False, True):
        load_adapter_state(model, full)
        main = LocalMainServer(MainServer(model, cut, settings(), device=CPU), want)
        main.main.flops = FlopCache(every=every)
        client = split.SplitClient(0, model, [data.train[j] for j in data.parts[0]], settings(6), cut=cut,
                                   wire_dtype=torch.float32, device=CPU, pad_id=tok.pad_token_id, seed=0,
                                   dial=main.dial)
        client.flops = FlopCache(every=every)
        record, update = split.train_client(LocalGrid({0: client}), 0, 1, init, main, want)
        assert record["status"] == "ok" and update is not None, record
        counts[every] = (record["flops"], main.take_compute()[0])
    cached, reference = counts[False], counts[True]
    assert cached == reference and cached[0] > 0 and cached[1] > 0  # client's and main server's FLOPs


def test_kd_client_and_server_counts_equal_counting_every_step(tiny, tmp_path, monkeypatch):
    """A whole KD run (clients distil, train, send logits; the server distils with keep-best): the FLOPs in its
    metrics equal those of the same run with every block counted."""
    import json

    from fedtune.paradigms import kd_public

    overrides = SMALL + ["federation.paradigm=kd", "federation.rounds=2", "train.local_steps=3", "train.batch_size=4",
                         "kd.public_size=6", "kd.distill_steps=2", "kd.server_steps=3", "kd.val_size=6",
                         "kd.val_every=1", "eval.max_examples=6"]

    def flops_of(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["type"], r.get("flops")) for r in records if r["type"] in ("client", "server")]

    cached = flops_of_run(cfg.load(None, overrides), tmp_path / "cached", flops_of)
    real = kd_public.FlopCache

    def every(enabled=True, *, every=False):
        return real(enabled, every=True)

    monkeypatch.setattr(kd_public, "FlopCache", every)
    monkeypatch.setattr("fedtune.paradigms.kd.FlopCache", every)
    reference = flops_of_run(cfg.load(None, overrides), tmp_path / "every", flops_of)
    assert cached == reference and all(f > 0 for _, f in cached)


def flops_of_run(c, out, read):
    from fedtune import experiment

    experiment.run(c, out, quiet=True)
    return read(out)


def test_the_public_logits_a_kd_client_sends_are_computed_without_autograd(setup):
    """reply_tensors is inference: nothing it returns (or counts) keeps an autograd graph alive."""
    from fedtune.paradigms import kd

    model, tok, data = setup
    examples = [data.train[j] for j in range(6)]
    public = kd.make_public_set([e for e in examples], data.task, vocab=len(tok), pad_id=tok.pad_token_id, top_k=4,
                                full_logits=False, temperature=1.0, batch_size=4)
    model.train()
    out = public.reply_tensors(model, CPU, flops=FlopCache())
    assert out and not any(t.requires_grad for t in out.values())
