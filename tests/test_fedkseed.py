"""FedKSeed: exact replay of (seed, scalar) histories, the two-point estimate against autograd, exact bytes,
the per-seed aggregation as FedAvg, refusals of malformed replies, and a tiny end-to-end run."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from fedtune import config as cfg
from fedtune import experiment
from fedtune.data.tasks import IGNORE, collate
from fedtune.experiment import prepare_data
from fedtune.models import attach_lora
from fedtune.paradigms import fedkseed as fk
from fedtune.progress import Bars
from fedtune.train import zeroth_order as zo
from fedtune.train.losses import lm_loss
from fedtune.wire import Message, WireError, decode, encode, encoded_size

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.name=tiny-llama", "data.demo_train_size=60", "data.demo_test_size=12", "federation.num_clients=2",
         "federation.clients_per_round=2", "federation.rounds=2", "federation.paradigm=fedkseed",
         "train.local_steps=4", "train.batch_size=4", "data.max_length=48", "eval.max_examples=12",
         "fedkseed.lr=0.01", "fedkseed.num_seeds=64"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small(tiny):
    c = cfg.load(None, SMALL)
    return c, prepare_data(c, tiny[1], Bars(quiet=True))


@pytest.fixture()
def setup(tiny, small):
    c, data = small
    model = attach_lora(tiny[0], c.peft, c.seed)
    yield c, model, tiny[1], data
    model.unload()


def client_for(c, model, tok, data, node, replayer):
    return fk.FedKSeedClient(node, model, [data.train[j] for j in data.parts[node]], fk.settings_of(c),
                             replayer=replayer, device=CPU, pad_id=tok.pad_token_id)


def ins(history, rnd, s):
    seeds, scalars = history
    return Message({"history_seeds": seeds, "history_scalars": scalars},
                   {"kind": "fedkseed_ins", "round": rnd, "dst": 0, **s.mine()})


def some_history(n=9, num_seeds=64):
    g = torch.Generator().manual_seed(3)
    return (torch.randint(0, num_seeds, (n,), generator=g, dtype=torch.int32),
            (torch.randn(n, generator=g) * 1e-3).to(torch.float32))


def test_replaying_the_uploaded_pairs_gives_exactly_the_clients_weights(setup):
    c, model, tok, data = setup
    _, params = fk.model_params(model)
    s = fk.settings_of(c)
    history = some_history()
    client = client_for(c, model, tok, data, 0, fk.Replayer(params, c.seed))
    w0 = zo.flat(params)
    reply = decode(encode(client(ins(history, 1, s))))  # as the server receives it
    trained = zo.flat(params)
    assert not torch.equal(trained, w0)
    # The server: its own replayer (from the initial weights), the history, then the client's pairs.
    zo.write(params, w0)
    server = fk.Replayer(params, c.seed)
    w = server.weights(*history)
    pairs = fk.read_pairs(reply, s.num_seeds, s.steps)
    zo.apply(w, [(k, fk.step_scalar(s.lr, g)) for k, g in pairs], c.seed)
    assert torch.equal(w, trained)
    zo.write(params, w0)


def test_a_late_client_rebuilds_the_servers_weights_exactly(setup):
    c, model, _, _ = setup
    _, params = fk.model_params(model)
    seeds, scalars = some_history(30)
    server = fk.Replayer(params, c.seed)
    for end in (10, 20, 30):  # the server replays round by round, from its cache
        w_server = server.weights(seeds[:end], scalars[:end])
    late = fk.Replayer(params, c.seed).weights(seeds, scalars)  # all at once, from the initial weights
    assert torch.equal(late, w_server)


def test_the_two_point_estimate_is_the_directional_derivative(setup):
    c, model, tok, data = setup
    m = copy.deepcopy(model).double()
    _, params = fk.model_params(m)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:  # LoRA's B starts at zero: move away from that special point
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    batch = collate(data.train[:4], tok.pad_token_id)
    w = zo.flat(params)
    z = zo.direction(c.seed, 5, w.numel(), dtype=torch.float64)
    for p in params:
        p.requires_grad_(True)

    def loss64():  # the token loss in float64 end to end (lm_loss takes float32 logits, too coarse at eps 1e-5)
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE)

    assert loss64().dtype == torch.float64
    torch.testing.assert_close(loss64().float(), lm_loss(m, batch)[0], rtol=1e-5, atol=0)
    grads = torch.autograd.grad(loss64(), params)
    exact = float(torch.cat([gr.reshape(-1) for gr in grads]) @ z)
    estimate, plus, minus = zo.projected_gradient(loss64, params, w, z, 1e-5)
    # Llama's RMSNorm computes in float32 even in a float64 model: that rounding bounds the agreement.
    assert abs(estimate - exact) <= 2e-4 * max(1.0, abs(exact)), (estimate, exact)
    # At the default eps, with the float32 loss the clients use: within 1%.
    f32, _, _ = zo.projected_gradient(lambda: lm_loss(m, batch)[0], params, w, z, 1e-3)
    assert abs(f32 - exact) <= 1e-2 * max(1.0, abs(exact)), (f32, exact)
    assert plus != minus


def test_bytes_are_the_payload_length_and_at_most_18_kb_up(setup):
    c, model, tok, data = setup
    _, params = fk.model_params(model)
    s = fk.settings_of(c)
    w0 = zo.flat(params)
    msg = ins(some_history(), 1, s)
    reply = client_for(c, model, tok, data, 1, fk.Replayer(params, c.seed))(msg)
    zo.write(params, w0)
    assert encoded_size(reply) == len(encode(reply)) and encoded_size(msg) == len(encode(msg))
    # 200 steps a round, as in the paper, with the metadata a client sends: still under 18 KB.
    big = Message({"seeds": torch.zeros(200, dtype=torch.int32), "grads": torch.zeros(200)}, dict(reply.meta))
    assert encoded_size(big) == len(encode(big)) <= 18 * 1024


def test_per_seed_scalars_move_the_server_to_the_fedavg_of_the_clients(setup):
    c, model, tok, data = setup
    _, params = fk.model_params(model)
    s = fk.settings_of(c)
    w0 = zo.flat(params)
    replayer = fk.Replayer(params, c.seed)
    weights, updates = [], []
    for node in (0, 1):
        reply = client_for(c, model, tok, data, node, replayer)(ins(some_history(0), 1, s))
        weights.append((zo.flat(params), reply.meta["num_examples"]))
        updates.append((fk.read_pairs(reply, s.num_seeds, s.steps), reply.meta["num_examples"]))
        zo.write(params, w0)
    seeds, scalars = fk.round_entries(updates, s.lr, s.num_seeds)
    assert seeds.dtype == torch.int32 and scalars.dtype == torch.float32 and len(seeds) <= 2 * s.steps
    w = fk.Replayer(params, c.seed).weights(seeds, scalars)
    total = sum(n for _, n in weights)
    fedavg = sum(wc * (n / total) for wc, n in weights)
    torch.testing.assert_close(w, fedavg, rtol=0, atol=1e-6)


def test_malformed_replies_are_refused():
    ok = {"seeds": torch.tensor([1, 2], dtype=torch.int32), "grads": torch.tensor([0.5, -0.5])}
    assert fk.read_pairs(Message(ok, {"kind": "fedkseed_res"}), 4, 2) == [(1, 0.5), (2, -0.5)]
    bad = [
        (Message(ok, {"kind": "fit_res"}), "fedkseed_res"),
        (Message({**ok, "seeds": torch.tensor([1, 9], dtype=torch.int32)}, {"kind": "fedkseed_res"}), r"\[0, 4\)"),
        (Message({**ok, "grads": torch.tensor([0.5, float("nan")])}, {"kind": "fedkseed_res"}), "finite|NaN"),
        (Message({**ok, "grads": torch.tensor([0.5])}, {"kind": "fedkseed_res"}), "shape"),
        (Message(ok, {"kind": "fedkseed_res"}), "between 1 and 1"),
    ]
    for i, (msg, match) in enumerate(bad):
        with pytest.raises(WireError, match=match):
            fk.read_pairs(msg, 4, 1 if i == 4 else 2)


def test_config_errors_name_the_field():
    with pytest.raises(cfg.ConfigError, match="fedkseed.eps"):
        cfg.load(None, [*SMALL, "fedkseed.eps=0"])
    with pytest.raises(cfg.ConfigError, match="fedkseed.num_seeds"):
        cfg.load(None, [*SMALL, "fedkseed.num_seeds=0"])
    with pytest.raises(cfg.ConfigError, match="fedkseed.local_steps"):
        cfg.load(None, [*SMALL, "train.local_steps=null", "train.local_epochs=1"])


def test_end_to_end_run_writes_access_and_exact_bytes(tmp_path):
    summary = experiment.run(cfg.load(None, SMALL), tmp_path, quiet=True)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["access"] == "white" and saved["backprop"] is False and saved["paradigm"] == "fedkseed"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in records if r["type"] == "client"]
    assert len(clients) == 4 and all(r["status"] == "ok" for r in clients)
    assert all(r["bytes_up"] <= 18 * 1024 and r["pairs"] == 4 for r in clients)
    # Down: the history only; round 2 carries round 1's entries (at most one per step of each client).
    assert clients[0]["bytes_down"] < clients[-1]["bytes_down"]
    assert summary["client_flops"] > 0 and summary["bytes_up"] == sum(r["bytes_up"] for r in clients)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
