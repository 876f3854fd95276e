"""KD's fast path (fedtune.paradigms.kd_fast, fedtune.train.graphed): its static-shape steps give the eager
path's losses, FLOPs per shape and adapters (on the CPU, without graphs); on a GPU its CUDA graphs give the
static eager steps' numbers (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from fedtune import config as cfg
from fedtune.experiment import prepare_data
from fedtune.models import attach_lora
from fedtune.paradigms import kd
from fedtune.progress import Bars
from fedtune.rounds import ServerHooks
from fedtune.runtime.local import LocalGrid
from fedtune.train.adapter import adapter_state
from fedtune.train.local_steps import TrainSettings
from test_kd import generation_setup

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def settings(static: bool | None, count_flops: bool = False, graphs: bool = True) -> TrainSettings:
    # SGD: an update is linear in the gradient, so adapters compare tightly (Adam's first steps are ~lr * sign(g),
    # which turns a 1e-9 difference in a near-zero gradient into one of 2 * lr).
    return TrainSettings(local_steps=2, local_epochs=None, batch_size=4, lr=0.1, optimizer="sgd",
                         count_flops=count_flops, cuda_graphs=graphs, static_steps=static)


def run_kd(model, parts, public, s: TrainSettings, device=CPU, rounds: int = 2):
    """Two rounds of KD (2 or 3 clients, 2 distillation, 2 private and 2 server steps); the log, the global adapter and
    the clients' adapters."""
    init = adapter_state(model)
    apps = {i: kd.KDClient(i, model, parts[i], public, s, init, distill_steps=2, device=device,
                           pad_id=public.pad_id, seed=0) for i in range(len(parts))}
    log: list[dict] = []
    hooks = ServerHooks(evaluate=lambda state: 0.0, log=log.append, save=lambda state, rnd: None,
                        bars=Bars(quiet=True))
    final, _ = kd.serve(LocalGrid(apps, serialize=False), public, model, init, s, server_steps=2, rounds=rounds,
                        clients_per_round=len(parts), seed=0, eval_every=10**9, device=device, hooks=hooks)
    return log, final, {i: a.state for i, a in apps.items()}


def numbers(log: list[dict]) -> list[float]:
    out = []
    for r in log:
        if r["type"] == "client":
            out += [r["train_loss_first"], r["train_loss_last"], r["distill_loss"] or 0.0]
        elif r["type"] == "server":
            out.append(r["distill_loss"] or 0.0)
    return out


def assert_same_run(eager, fast, rtol=1e-4):
    (log_e, final_e, clients_e), (log_f, final_f, clients_f) = eager, fast
    assert numbers(log_f) == pytest.approx(numbers(log_e), rel=rtol, abs=1e-6)
    # The wire is unchanged: the same messages, up to the printed length of the floats in their JSON headers
    # (a loss printed with one digit more or less; the golden tests allow the same 16 bytes a message).
    up_f, up_e = [r.get("bytes_up") for r in log_f], [r.get("bytes_up") for r in log_e]
    assert len(up_f) == len(up_e) and all((a is None) == (b is None) and (a is None or abs(a - b) <= 16)
                                          for a, b in zip(up_f, up_e)), (up_f, up_e)
    for k in final_e:
        torch.testing.assert_close(final_f[k], final_e[k], rtol=rtol, atol=2e-5)
    for i in clients_e:
        for k in clients_e[i]:
            torch.testing.assert_close(clients_f[i][k], clients_e[i][k], rtol=rtol, atol=2e-5)


@pytest.fixture()
def classification(tiny):
    base, tok = tiny
    c = cfg.load(None, ["model.name=tiny-llama", "federation.paradigm=kd", "data.demo_train_size=60", "data.demo_test_size=12",
                        "federation.num_clients=2", "federation.clients_per_round=2", "kd.public_fraction=0.2", "kd.public_size=8", "eval.base=false"])
    data = prepare_data(c, tok, Bars(quiet=True))
    model = attach_lora(base, c.peft, c.seed)
    with torch.no_grad():  # a non-zero B: the adapter changes the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(name) & 0xFFFF))
    parts = [[data.train[j] for j in part] for part in data.parts]
    yield model, tok, data, parts
    model.unload()


def test_static_kd_equals_eager_kd_on_classification(classification):
    model, tok, data, parts = classification
    public = kd.make_public_set(data.public, data.task, vocab=len(tok), pad_id=tok.pad_token_id, top_k=8,
                                full_logits=False, temperature=2.0, batch_size=4)
    start = adapter_state(model)
    eager = run_kd(model, parts, public, settings(None))
    kd.load_adapter_state(model, start)
    fast = run_kd(model, parts, public, settings(True))
    assert_same_run(eager, fast)
    assert kd.fast_for(model, public, settings(True), CPU) is not None
    assert kd.fast_for(model, public, settings(None), CPU) is None  # the CPU default stays eager


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_static_kd_equals_eager_kd_on_generation(tiny, full):
    base, tok = tiny
    c = cfg.load(None, ["model.name=tiny-llama"])
    model = attach_lora(base, c.peft, c.seed)
    try:
        task, private, prompts = generation_setup(tok, 6)
        public = kd.make_public_set(prompts, task, vocab=len(tok), pad_id=tok.pad_token_id, top_k=4,
                                    full_logits=full, temperature=1.0, batch_size=4)
        parts = [private[:3], private[1:]]
        start = adapter_state(model)
        eager = run_kd(model, parts, public, settings(None))
        kd.load_adapter_state(model, start)
        fast = run_kd(model, parts, public, settings(True))
        assert_same_run(eager, fast)
    finally:
        model.unload()


def test_fast_path_counts_each_shape_once_and_the_same_flops_per_step(classification, monkeypatch):
    """FLOPs with the shared per-shape cache equal a count of every step (padding included: it is real work)."""
    from fedtune.flops import FlopCache

    model, tok, data, parts = classification
    public = kd.make_public_set(data.public[:4], data.task, vocab=len(tok), pad_id=tok.pad_token_id, top_k=8,
                                full_logits=False, temperature=1.0, batch_size=4)
    start = adapter_state(model)
    log, _, _ = run_kd(model, parts[:1], public, settings(True, count_flops=True), rounds=1)
    cached = [r["flops"] for r in log if r["type"] in ("client", "server")]
    assert all(f > 0 for f in cached)
    assert any(k[0] == "distil" for k in kd.fast_for(model, public, settings(True), CPU).flop_counts)
    kd.fast_for(model, public, settings(True), CPU).flop_counts.clear()
    original = FlopCache.__init__
    monkeypatch.setattr(FlopCache, "__init__", lambda self, enabled=True, every=False: original(self, enabled,
                                                                                               every=True))
    kd.load_adapter_state(model, start)
    log, _, _ = run_kd(model, parts[:1], public, settings(True, count_flops=True), rounds=1)
    assert [r["flops"] for r in log if r["type"] in ("client", "server")] == cached


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_kd_equals_static_eager_kd_on_cuda(tiny):
    base, tok = tiny
    c = cfg.load(None, ["model.name=tiny-llama"])
    model = attach_lora(base.to("cuda"), c.peft, c.seed)
    try:
        task, private, prompts = generation_setup(tok, 6)
        public = kd.make_public_set(prompts, task, vocab=len(tok), pad_id=tok.pad_token_id, top_k=4,
                                    full_logits=False, temperature=1.0, batch_size=4)
        parts = [private[:3], private[1:]]
        start = adapter_state(model)
        cuda = torch.device("cuda")
        eager = run_kd(model, parts, public, settings(True, graphs=False), device=cuda, rounds=3)
        kd.load_adapter_state(model, start)
        fast = run_kd(model, parts, public, settings(None), device=cuda, rounds=3)
        shared = kd.fast_for(model, public, settings(None), cuda)
        assert shared.train.captured and shared.distil.captured and shared.logits.captured
        assert shared.train.failure is None and shared.distil.failure is None
        assert_same_run(eager, fast, rtol=1e-3)
    finally:
        model.unload()
        base.to("cpu")
