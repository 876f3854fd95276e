"""Split learning's fast path (fedtune.train.graphed through split.SplitClient and split_model.MainServer): the
static-shape bottom and top steps give the eager path's losses, bytes and adapters (on the CPU, without graphs);
on a GPU the CUDA graphs give the static eager steps' numbers (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from fedtune import config as cfg
from fedtune.experiment import prepare_data
from fedtune.models import attach_lora, backbone
from fedtune.paradigms import split
from fedtune.progress import Bars
from fedtune.rounds import ServerHooks
from fedtune.runtime.local import LocalGrid
from fedtune.split_model import CLIENT, Cut, MainServer, bottom_forward, right_padded
from fedtune.split_session import Activations, LocalMainServer
from fedtune.strategies import FedAvg
from fedtune.train.adapter import adapter_state, load_adapter_state
from fedtune.train.local_steps import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def settings(static: bool | None, graphs: bool = True) -> TrainSettings:
    # SGD: an update is linear in the gradient, so adapters compare tightly (see test_kd_fast).
    return TrainSettings(local_steps=2, local_epochs=None, batch_size=4, lr=0.1, optimizer="sgd", count_flops=False,
                         cuda_graphs=graphs, static_steps=static)


@pytest.fixture()
def setup(tiny):
    base, tok = tiny
    c = cfg.load(None, ["model.name=tiny-llama", "federation.paradigm=split", "data.demo_train_size=40",
                        "data.demo_test_size=8", "federation.num_clients=2", "federation.clients_per_round=2",
                        "eval.base=false"])
    data = prepare_data(c, tok, Bars(quiet=True))
    model = attach_lora(base, c.peft, c.seed)
    with torch.no_grad():  # a non-zero B: the adapter changes the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(name) & 0xFFFF))
    yield model, tok, [[data.train[j] for j in part] for part in data.parts]
    model.unload()


def run_split(model, tok, parts, s: TrainSettings, device=CPU, rounds: int = 2, serialize: bool = True):
    body = backbone(model).config
    cut = Cut(model, None)
    want = Activations(torch.float32, body.hidden_size, body.vocab_size)
    main = LocalMainServer(MainServer(model, cut, s, device=device, count_flops=False), want, serialize=serialize)
    apps = {i: split.SplitClient(i, model, parts[i], s, cut=cut, wire_dtype=torch.float32, device=device,
                                 pad_id=tok.pad_token_id, seed=0, dial=main.dial) for i in range(len(parts))}
    log: list[dict] = []
    hooks = ServerHooks(evaluate=lambda state: 0.0, log=log.append, save=lambda state, rnd: None,
                        bars=Bars(quiet=True))
    bottom, _ = split.serve(LocalGrid(apps, serialize=serialize), cut.part(adapter_state(model), CLIENT), main,
                            FedAvg(), want, rounds=rounds, clients_per_round=len(parts), seed=0, eval_every=10**9,
                            hooks=hooks)
    return log, bottom, main.state(), main, apps


def assert_same_run(eager, fast, rtol=1e-4):
    (log_e, bottom_e, top_e, *_), (log_f, bottom_f, top_f, *_) = eager, fast
    clients_e = [r for r in log_e if r["type"] == "client"]
    clients_f = [r for r in log_f if r["type"] == "client"]
    assert [r["status"] for r in clients_f] == ["ok"] * len(clients_e)
    for a, b in zip(clients_e, clients_f):
        assert (b["train_loss_first"], b["train_loss_last"]) == pytest.approx((a["train_loss_first"],
                                                                                a["train_loss_last"]), rel=rtol)
        # The real width travels: the activations' stream is byte for byte the eager one; other messages differ
        # only in the digits of the floats in their metadata (losses, seconds).
        assert b["stream_bytes_up"] == a["stream_bytes_up"]
        for k in ("bytes_up", "bytes_down", "stream_bytes_down"):
            assert abs(b[k] - a[k]) <= 32 * (b["server_steps"] + 1)
    for e, f in ((bottom_e, bottom_f), (top_e, top_f)):
        assert set(e) == set(f)
        for k in e:
            torch.testing.assert_close(f[k], e[k], rtol=rtol, atol=2e-5)


def test_static_split_equals_eager_split(setup):
    model, tok, parts = setup
    start = adapter_state(model)
    eager = run_split(model, tok, parts, settings(None))
    assert eager[3].main.top is None and eager[4][0].bottom is None  # the CPU default stays eager
    load_adapter_state(model, start)
    fast = run_split(model, tok, parts, settings(True))
    assert fast[3].main.top is not None and fast[4][0].bottom is not None
    assert_same_run(eager, fast)


def test_static_bottom_equals_masked_bottom_at_real_positions_and_padding_check(setup):
    model, tok, parts = setup
    from fedtune.data.tasks import collate
    from fedtune.train.graphed import pad_width

    batch = collate(sorted(parts[0], key=lambda e: len(e.prompt_ids))[::3][:3], tok.pad_token_id)
    mask = batch["attention_mask"]
    assert not bool(mask.all())  # real padding
    masked = bottom_forward(model, 1, batch["input_ids"], mask)
    static = bottom_forward(model, 1, pad_width(batch["input_ids"], 128, 0), None)[:, : mask.shape[1]]
    real = mask.bool()
    torch.testing.assert_close(static[real], masked[real], rtol=1e-5, atol=1e-6)
    assert right_padded(mask) and not right_padded(mask.flip(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_split_equals_static_eager_split_on_cuda(tiny):
    base, tok = tiny
    c = cfg.load(None, ["model.name=tiny-llama", "federation.paradigm=split", "data.demo_train_size=40",
                        "data.demo_test_size=8", "federation.num_clients=2", "federation.clients_per_round=2",
                        "eval.base=false"])
    data = prepare_data(c, tok, Bars(quiet=True))
    model = attach_lora(base.to("cuda"), c.peft, c.seed)
    parts = [[data.train[j] for j in part] for part in data.parts]
    cuda = torch.device("cuda")
    try:
        start = adapter_state(model)
        eager = run_split(model, tok, parts, settings(True, graphs=False), device=cuda, rounds=3)
        load_adapter_state(model, start)
        fast = run_split(model, tok, parts, settings(None), device=cuda, rounds=3)
        main, apps = fast[3], fast[4]
        assert main.main.top.captured and apps[0].bottom.captured
        assert main.main.top.failure is None and apps[0].bottom.failure is None
        assert_same_run(eager, fast, rtol=1e-3)
    finally:
        model.unload()
        base.to("cpu")
