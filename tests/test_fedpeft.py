"""The FedLLM round loop on tiny-llama: aggregation, bad replies, FedProx."""

from __future__ import annotations

import pytest
import torch

from fedtune import config as cfg
from fedtune.experiment import prepare_data
from fedtune.models import attach_lora
from fedtune.paradigms import fedpeft
from fedtune.progress import Bars
from fedtune.grid import ClientApp
from fedtune.runtime.local import LocalGrid
from fedtune.strategies import FedAvg
from fedtune.wire import Message
from fedtune.rounds import ServerHooks
from fedtune.train.adapter import adapter_state
from fedtune.train.local_steps import TrainSettings
from fedtune.train.step_runner import make_runner

SMALL = ["model.name=tiny-llama", "data.demo_train_size=60", "data.demo_test_size=12", "federation.num_clients=3",
         "federation.clients_per_round=3", "federation.rounds=1", "train.local_steps=2", "train.batch_size=4",
         "train.lr=0.01", "eval.base=false"]


@pytest.fixture()
def setup(tiny):
    base, tok = tiny
    c = cfg.load(None, SMALL)
    data = prepare_data(c, tok, Bars(quiet=True))
    model = attach_lora(base, c.peft, c.seed)
    yield c, model, tok, data
    model.unload()


def make_client(i, model, tok, data, mu=0.0):
    s = TrainSettings(local_steps=2, local_epochs=None, batch_size=4, lr=0.01, prox_mu=mu, count_flops=False)
    return fedpeft.FedPeftClient(i, model, [data.train[j] for j in data.parts[i]], s, device=torch.device("cpu"),
                                 pad_id=tok.pad_token_id, seed=0)


def hooks(log):
    return ServerHooks(evaluate=lambda s: 0.0, log=log.append, save=lambda s, r: None, bars=Bars(quiet=True))


def test_round_aggregate_is_weighted_mean_and_bad_replies_are_skipped(setup):
    c, model, tok, data = setup
    init = adapter_state(model)
    good = {i: make_client(i, model, tok, data) for i in (0, 1)}
    # Independent computation: what each good client returns for round 1, and the weighted mean by hand.
    ref = {i: app(Message(init, {"round": 1, "dst": i})) for i, app in good.items()}
    n = {i: ref[i].meta["num_examples"] for i in good}
    expected = {k: (n[0] * ref[0].tensors[k] + n[1] * ref[1].tensors[k]) / (n[0] + n[1]) for k in init}

    def nan_client(msg):
        return Message({k: torch.full_like(v, float("nan")) for k, v in msg.tensors.items()},
                       {"num_examples": 1000})

    def wrong_shape(msg):
        return Message({k: v[..., :1].clone() for k, v in msg.tensors.items()}, {"num_examples": 1000})

    def crashing(msg):
        raise RuntimeError("out of memory on the client")

    def oversize(msg):
        t = dict(msg.tensors)
        t["padding"] = torch.zeros(200_000)
        return Message(t, {"num_examples": 1000})

    apps = {0: good[0], 1: good[1], 2: nan_client, 3: wrong_shape, 4: crashing, 5: oversize}
    limit = 2 * max(len(v.numpy().tobytes()) for v in init.values()) * len(init)
    grid = LocalGrid(apps, serialize=True, max_bytes=limit)
    log: list[dict] = []
    final, _ = fedpeft.serve(grid, init, FedAvg(), rounds=1, clients_per_round=6, seed=0, eval_every=1,
                             hooks=hooks(log), min_replies=1)
    for k in init:
        torch.testing.assert_close(final[k], expected[k], rtol=1e-6, atol=1e-7)
    status = {r["client"]: r["status"] for r in log if r["type"] == "client"}
    assert status == {0: "ok", 1: "ok", 2: "rejected", 3: "rejected", 4: "failed", 5: "failed"}
    errors = {r["client"]: r.get("error", "") for r in log if r["type"] == "client"}
    assert "NaN/Inf" in errors[2] and "shape" in errors[3] and "out of memory" in errors[4]
    assert "over the limit" in errors[5]
    assert [r for r in log if r["type"] == "round"][0]["replies"] == 2


def test_too_few_replies_keep_the_previous_global_state(setup):
    c, model, tok, data = setup
    init = adapter_state(model)

    def crashing(msg):
        raise RuntimeError("boom")

    log: list[dict] = []
    final, _ = fedpeft.serve(LocalGrid({0: crashing, 1: make_client(1, model, tok, data)}), init, FedAvg(),
                             rounds=1, clients_per_round=2, seed=0, eval_every=1, hooks=hooks(log), min_replies=2)
    for k in init:
        assert torch.equal(final[k], init[k])
    assert log[-2]["aggregated"] is False


def test_bytes_are_the_exact_encoded_sizes(setup):
    from fedtune.wire import encode

    c, model, tok, data = setup
    init = adapter_state(model)
    log: list[dict] = []
    app = make_client(0, model, tok, data)
    seen = []

    def recording(msg):
        reply = app(msg)
        seen.append((msg, reply))
        return reply

    fedpeft.serve(LocalGrid({0: recording}, serialize=False), init, FedAvg(), rounds=1, clients_per_round=1, seed=0,
                  eval_every=1, hooks=hooks(log))
    rec = [r for r in log if r["type"] == "client"][0]
    msg, reply = seen[0]
    assert rec["bytes_down"] == len(encode(msg))
    assert rec["bytes_up"] == len(encode(reply))
    # LoRA state is the bulk of it: 4 bytes per float32 value plus a header
    values = sum(v.numel() for v in init.values())
    assert 4 * values < rec["bytes_up"] < 4 * values + 20_000


def test_fedprox_with_mu_zero_equals_fedavg_and_mu_pulls_towards_global(setup):
    c, model, tok, data = setup
    init = adapter_state(model)
    msg = Message(init, {"round": 1, "dst": 0})
    plain = make_client(0, model, tok, data, mu=0.0)(msg).tensors
    prox0 = make_client(0, model, tok, data, mu=0.0)(msg).tensors
    strong = make_client(0, model, tok, data, mu=100.0)(msg).tensors
    for k in init:
        assert torch.equal(plain[k], prox0[k])
    dist = lambda s: sum(float(((s[k] - init[k]) ** 2).sum()) for k in init)  # noqa: E731
    assert 0 < dist(strong) < dist(plain)


def test_local_epochs_sets_the_number_of_steps():
    s = TrainSettings(local_steps=None, local_epochs=2.0, batch_size=8, lr=1e-3)
    assert s.steps_for(20) == 5  # ceil(2 * 20 / 8)


class _TwoPhase(ClientApp):
    """A client app with the `start` protocol that records when each phase runs."""

    def __init__(self, node, events, fail_at=None):
        self.node, self.events, self.fail_at = node, events, fail_at

    def start(self, msg):
        self.events.append(("start", self.node))
        if self.fail_at == "start":
            raise RuntimeError("boom at start")

        def reply():
            self.events.append(("reply", self.node))
            if self.fail_at == "reply":
                raise RuntimeError("boom at reply")
            return Message({"x": torch.full((2,), float(self.node))}, {"num_examples": 1})

        return reply


def test_local_grid_stream_starts_the_next_client_before_taking_a_reply():
    events = []
    apps = {0: _TwoPhase(0, events), 1: _TwoPhase(1, events, fail_at="start"), 2: _TwoPhase(2, events, "reply"),
            3: _TwoPhase(3, events)}
    grid = LocalGrid(apps)
    replies = grid.send_and_receive([Message({}, {"dst": n, "round": 1}) for n in (0, 1, 2, 3)])
    # Client k+1 is started before reply k is taken; every app still starts in message order.
    assert events == [("start", 0), ("start", 1), ("reply", 0), ("start", 2), ("start", 3), ("reply", 2),
                      ("reply", 3)]
    assert torch.equal(replies[0].tensors["x"], torch.zeros(2)) and torch.equal(replies[3].tensors["x"],
                                                                               torch.full((2,), 3.0))
    # A failure in either phase is that client's error reply only.
    assert "boom at start" in replies[1].meta["error"] and "boom at reply" in replies[2].meta["error"]
    assert [r.meta["src"] for r in replies] == [0, 1, 2, 3]


def test_streamed_clients_on_a_shared_model_reply_as_when_run_one_at_a_time(setup):
    """Starting client k+1 (which loads its state into the shared model) must not change reply k."""
    c, model, tok, data = setup
    global_state = adapter_state(model)
    messages = [Message(global_state, {"kind": "fit_ins", "round": 1, "dst": i}) for i in range(3)]
    apps = {i: make_client(i, model, tok, data) for i in range(3)}
    one_by_one = [apps[i](m) for i, m in enumerate(messages)]
    streamed = list(LocalGrid(apps, serialize=False).stream(messages))
    for a, b in zip(one_by_one, streamed):
        assert a.meta["train_loss"] == b.meta["train_loss"]
        for k in a.tensors:
            torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=0, atol=0)
    # The clients really trained different adapters (the check above is not comparing one state thrice).
    key = next(k for k in global_state if "lora_B" in k)
    assert not torch.equal(streamed[0].tensors[key], streamed[1].tensors[key])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous path runs on CUDA only")
def test_streamed_clients_on_cuda_with_graphs_reply_as_when_run_one_at_a_time(tiny):
    """On CUDA, client k+1 loads its state into the shared model while client k's copy is still queued."""
    import copy

    base, tok = tiny
    c = cfg.load(None, SMALL)
    data = prepare_data(c, tok, Bars(quiet=True))
    model = attach_lora(copy.deepcopy(base).cuda(), c.peft, c.seed)
    s = TrainSettings(local_steps=3, local_epochs=None, batch_size=4, lr=0.01, count_flops=False)
    runner = make_runner(model, s, device=torch.device("cuda"), pad_id=tok.pad_token_id)
    apps = {i: fedpeft.FedPeftClient(i, model, [data.train[j] for j in data.parts[i]], s, device=torch.device("cuda"),
                                     pad_id=tok.pad_token_id, seed=0, runner=runner) for i in range(3)}
    global_state = adapter_state(model)
    messages = [Message(global_state, {"kind": "fit_ins", "round": 1, "dst": i}) for i in range(3)]
    one_by_one = [apps[i](m) for i, m in enumerate(messages)]
    assert runner.captured_shapes > 0
    streamed = list(LocalGrid(apps, serialize=False).stream(messages))
    for a, b in zip(one_by_one, streamed):
        assert a.meta["train_loss"] == b.meta["train_loss"] and b.meta["seconds"] > 0
        for k in a.tensors:
            torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=0, atol=0)
    key = next(k for k in global_state if "lora_B" in k)
    assert not torch.equal(streamed[0].tensors[key], streamed[1].tensors[key])
