"""Split-FedLLM: a split step equals the unsplit one, exact bytes per step, cut checks, failures, end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import fedtune
from conftest import EXAMPLES
from fedtune import config as cfg
from fedtune.data.tasks import Example, collate
from fedtune.experiment import prepare_data
from fedtune.models import attach_lora
from fedtune.train.losses import lm_loss
from fedtune.paradigms import fedpeft, split
from fedtune.progress import Bars
from fedtune.runtime.local import LocalGrid
from fedtune.models import backbone
from fedtune.split_model import CLIENT, SERVER, Cut, MainServer, bottom_forward, resolve_cut, top_forward
from fedtune.split_session import Activations, LocalMainServer
from fedtune.strategies import FedAvg
from fedtune import wire
from fedtune.wire import Message, WireError, decode, encode, encoded_size
from fedtune.rounds import ServerHooks
from fedtune.train.adapter import adapter_state
from fedtune.train.local_steps import TrainSettings
from helpers import Recording

CPU = torch.device("cpu")
VOCAB, HIDDEN, LAYERS = 96, 32, 4


def settings(steps=1, lr=0.0, batch_size=4, max_grad_norm=None):
    return TrainSettings(local_steps=steps, local_epochs=None, batch_size=batch_size, lr=lr, optimizer="sgd",
                                 max_grad_norm=max_grad_norm, count_flops=False)


@pytest.fixture(scope="module")
def four_layers():
    """A 4-layer Llama (GQA, untied head) with random LoRA on attention and the LM head, and a padded batch."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = LlamaForCausalLM(config).eval()
        for p in base.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"])
        model = get_peft_model(base, lora)
        # LoRA starts with B = 0, which would make every A gradient zero: give both random values.
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.2)
        gen = random.Random(0)
        examples = [Example([gen.randrange(1, VOCAB) for _ in range(n)], [gen.randrange(1, VOCAB) for _ in range(t)])
                    for n, t in [(5, 2), (9, 1), (3, 3), (11, 2)]]  # different lengths: right padding
    return model, examples


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("u_shaped", [False, True], ids=["standard", "u_shaped"])
@pytest.mark.parametrize("cut_layer", [1, 2, LAYERS - 1])
def test_one_split_step_gives_the_unsplit_gradients_and_loss(four_layers, cut_layer, u_shaped):
    model, examples = four_layers
    params = trainable(model)
    model.zero_grad(set_to_none=True)
    loss, _ = lm_loss(model, collate(examples, pad_id=0))
    loss.backward()
    expected = {n: p.grad.clone() for n, p in params.items()}

    cut = Cut(model, cut_layer, u_shaped=u_shaped)
    sides = {n: cut.side(n) for n in params}
    assert CLIENT in sides.values() and SERVER in sides.values()
    assert sides["base_model.model.lm_head.lora_B.default.weight"] == (CLIENT if u_shaped else SERVER)
    # lr = 0: the step leaves the weights alone and the gradients in .grad, through the real protocol
    want = Activations(torch.float32, HIDDEN, VOCAB)
    main = LocalMainServer(MainServer(model, cut, settings(), device=CPU, count_flops=False), want)
    client = split.SplitClient(0, model, examples, settings(), cut=cut, wire_dtype=torch.float32, device=CPU,
                               pad_id=0, seed=0, dial=main.dial)
    model.zero_grad(set_to_none=True)
    bottom = cut.part(adapter_state(model), CLIENT)
    record, update = split.train_client(LocalGrid({0: client}), 0, 1, bottom, main, want)
    assert record["status"] == "ok" and record["server_steps"] == 1, record
    for n, p in params.items():
        assert p.grad is not None, f"{n} ({sides[n]}) got no gradient"
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-5, msg=f"{n} ({sides[n]})")
    assert record["train_loss"] == pytest.approx(float(loss), abs=1e-5)
    assert {k for k in update[0]} == set(bottom)


@pytest.mark.parametrize("cut_layer", [1, 2, LAYERS - 1])
def test_split_forward_uses_the_padding_mask_like_the_unsplit_model(four_layers, cut_layer):
    # Left padding: with right padding a causal model never looks at the pads, so the mask would go untested.
    model, _ = four_layers
    ids = torch.randint(1, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    with torch.no_grad():
        expected = backbone(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        at_cut = bottom_forward(model, cut_layer, ids, mask)
        got = backbone(model).norm(top_forward(model, cut_layer, at_cut, mask))
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-6)


def test_cut_layer_out_of_range_fails_with_a_clear_message(tiny):
    for bad in (0, LAYERS):
        with pytest.raises(ValueError, match=rf"split.cut_layer = {bad} .*L = {LAYERS} layers.*1 <= cut_layer < 4"):
            resolve_cut(bad, LAYERS)
    assert resolve_cut(None, LAYERS) == 2
    with pytest.raises(ValueError, match=r"split.cut_layer = None \(default L // 2 = 0\).*L = 1"):
        resolve_cut(None, 1)
    with pytest.raises(ValueError, match="split.cut_layer = 0"):
        cfg.load(None, ["federation.paradigm=split", "split.cut_layer=0"])
    base, _ = tiny
    model = attach_lora(base, cfg.load(None, []).peft, 0)
    try:
        with pytest.raises(ValueError, match=r"split.cut_layer = 2 .*L = 2 layers"):
            Cut(model, 2)
    finally:
        model.unload()


SMALL = ["model.name=tiny-llama", "data.demo_train_size=60", "data.demo_test_size=12", "federation.num_clients=2",
         "federation.clients_per_round=2", "data.max_length=32", "eval.base=false"]


@pytest.fixture(scope="module")
def tiny_data(tiny):
    return prepare_data(cfg.load(None, SMALL), tiny[1], Bars(quiet=True))


@pytest.fixture()
def tiny_setup(tiny, tiny_data):
    base, tok = tiny
    data = tiny_data
    model = attach_lora(base, cfg.load(None, SMALL).peft, 0)
    yield model, tok, data
    model.unload()


class RecordingStream:
    """A client's stream to the main server that remembers every (message, reply) pair, and may tamper with
    what the client sends (``tamper(msg) -> msg``)."""

    def __init__(self, stream, log, tamper=None):
        self.stream, self.log, self.tamper = stream, log, tamper

    def exchange(self, msg):
        if self.tamper is not None:
            msg = self.tamper(msg)
        reply = self.stream.exchange(msg)
        self.log.append((msg, reply))
        return reply

    @property
    def bytes_up(self):
        return self.stream.bytes_up

    @property
    def bytes_down(self):
        return self.stream.bytes_down

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def tiny_parts(model, tok, data, wire_dtype, steps=2, tamper=None):
    """The cut, the clients (their streams recorded in ``main.stream_log``), the main server and the spec."""
    cut = Cut(model, None)
    s = settings(steps=steps, lr=0.01, max_grad_norm=1.0)
    want = Activations(wire_dtype, model.config.hidden_size, model.config.vocab_size)
    main = LocalMainServer(MainServer(model, cut, s, device=CPU, count_flops=False), want)
    main.stream_log = []
    tampers = tamper or {}

    def dial(node, key=""):
        return RecordingStream(main.dial(node, key), main.stream_log, tampers.get(node))

    clients = {i: split.SplitClient(i, model, [data.train[j] for j in data.parts[i]], s, cut=cut,
                                    wire_dtype=wire_dtype, device=CPU, pad_id=tok.pad_token_id, seed=0, dial=dial)
               for i in range(len(data.parts))}
    return cut, clients, main, want


@pytest.mark.parametrize("wire_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bytes_per_step_are_batch_seq_hidden_values_plus_the_header(tiny_setup, wire_dtype):
    model, tok, data = tiny_setup
    cut, clients, main, want = tiny_parts(model, tok, data, wire_dtype)
    grid = Recording(LocalGrid({0: clients[0]}))
    record, update = split.train_client(grid, 0, 1, cut.part(adapter_state(model), CLIENT), main, want)
    assert record["status"] == "ok" and update is not None
    # the client-round's bytes are the exact encoded sizes of everything exchanged: the Grid's and the stream's
    steps = main.stream_log
    assert record["bytes_down"] == sum(len(encode(m)) for m, _ in grid.log) + sum(len(encode(r)) for _, r in steps)
    assert record["bytes_up"] == sum(len(encode(r)) for _, r in grid.log) + sum(len(encode(m)) for m, _ in steps)
    per_value = torch.tensor([], dtype=wire_dtype).element_size()
    hidden = model.config.hidden_size
    acts = [m for m, _ in steps if m.kind == "split_act"]
    grads = [r for _, r in steps if r.kind == "split_grad"]
    assert len(acts) == len(grads) == 2
    for msg, extra_per_position in [(m, 1 + 4) for m in acts] + [(m, 0) for m in grads]:
        tensor = msg.tensors["activations" if msg.kind == "split_act" else "grad"]
        assert tensor.dtype == wire_dtype
        b, s, h = tensor.shape
        assert h == hidden
        data_bytes = encode(msg)
        header = 8 + int.from_bytes(data_bytes[:8], "little")  # safetensors: u64 length + JSON header
        assert header < 1024
        # activations / gradient: batch x seq x hidden x bytes per value; up also the mask (bool) and labels (int32)
        assert len(data_bytes) == encoded_size(msg) == header + b * s * hidden * per_value + b * s * extra_per_position
    print(f"{wire_dtype}: up {[encoded_size(m) for m in acts]}, down {[encoded_size(m) for m in grads]}, "
          f"shapes {[tuple(m.tensors['activations'].shape) for m in acts]}")


def test_a_failing_client_is_skipped_and_the_others_are_averaged(tiny_setup):
    model, tok, data = tiny_setup
    def nan_on_step_2(msg):
        if msg.kind == "split_act" and msg.meta["step"] == 2:
            msg.tensors["activations"][0, 0, 0] = float("nan")
        return msg

    cut, clients, main, want = tiny_parts(model, tok, data, torch.float32, tamper={1: nan_on_step_2})
    grid = Recording(LocalGrid({0: clients[0], 1: clients[1]}))
    init = cut.part(adapter_state(model), CLIENT)
    top_before = main.state()
    log: list[dict] = []
    hooks = ServerHooks(evaluate=lambda s: 0.0, log=log.append, save=lambda s, r: None, bars=Bars(quiet=True))
    final, _ = split.serve(grid, init, main, FedAvg(), want, rounds=1, clients_per_round=2, seed=0, eval_every=1,
                           hooks=hooks)
    records = {r["client"]: r for r in log if r["type"] == "client"}
    assert records[0]["status"] == "ok" and records[1]["status"] == "rejected"
    assert "NaN" in records[1]["error"]
    assert records[1]["server_steps"] == 1 and records[1]["bytes_up"] > 0
    # the global bottom is client 0's alone; the server kept its 2 + 1 steps
    (returned,) = [r.tensors for _, r in grid.log if r.kind == "fit_res"]
    for k in init:
        torch.testing.assert_close(final[k], returned[k], rtol=0, atol=0)
    assert any(not torch.equal(v, top_before[k]) for k, v in main.state().items())
    assert [r for r in log if r["type"] == "round"][0]["replies"] == 1


# quickstart-tiny, made smaller: 2 rounds of 2 of its 3 clients, one step each, short sequences
E2E = ["federation.rounds=2", "federation.clients_per_round=2", "train.local_steps=1", "data.max_length=32",
       "eval.max_examples=12", "eval.base=false"]


def test_end_to_end_split_run_reports_bytes_and_both_sides_flops(tmp_path):
    c_split = cfg.load(EXAMPLES / "quickstart-tiny.yaml", E2E + ["federation.paradigm=split"])
    c_fed = cfg.load(EXAMPLES / "quickstart-tiny.yaml", E2E)
    s = fedtune.run(c_split, out=tmp_path / "split", quiet=True)
    f = fedtune.run(c_fed, out=tmp_path / "fedpeft", quiet=True)
    on_disk = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert on_disk["paradigm"] == "split" and on_disk["accuracy"] is not None
    assert on_disk["failed_client_rounds"] == 0 and on_disk["client_rounds"] == 4
    assert s["bytes_up"] > 0 and s["bytes_down"] > 0
    assert s["client_flops"] > 0 and s["server_flops"] > 0
    # the client computes only its bottom blocks
    assert s["client_flops"] < f["client_flops"]
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records if r["type"] == "server"] == [1, 2]
    for r in (r for r in records if r["type"] == "client"):
        assert {"bytes_down", "bytes_up", "num_examples", "train_loss", "flops", "peak_memory_bytes", "seconds",
                "steps"} <= set(r)
    assert (tmp_path / "split" / "adapter" / "adapter_model.safetensors").is_file()


class ServiceStandIn:
    """A client's end of a split-service session without gRPC: each step's reply comes from a `MainServer`, as
    real wire bytes decoded the way `StepStream.exchange` decodes them (checked only when given `expect`)."""

    def __init__(self, main: MainServer, nan_at_step: int | None = None) -> None:
        self.main, self.nan_at_step = main, nan_at_step
        self.bytes_up = self.bytes_down = 0

    def exchange(self, msg: Message, expect=None) -> Message:
        act = decode(encode(msg)).tensors
        grad, loss = self.main.forward_backward(act["activations"], act["attention_mask"], act["labels"])
        if msg.meta["step"] == self.nan_at_step:
            grad[0, 0, 0] = float("nan")
        reply = Message({"grad": grad}, {"kind": "split_grad", "round": msg.meta["round"], "step": msg.meta["step"],
                                         "last": msg.meta["step"] == msg.meta["steps"], "loss": loss})
        return decode(encode(reply), expect=expect)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


@pytest.mark.parametrize("nan_at_step", [None, 2])
def test_a_split_client_checks_each_main_server_reply_once_and_refuses_a_bad_one(tiny_setup, monkeypatch, nan_at_step):
    model, tok, data = tiny_setup
    cut, clients, main, want = tiny_parts(model, tok, data, torch.float32, steps=3)
    client = clients[0]
    client.dial = lambda node, key: ServiceStandIn(main.main, nan_at_step)
    checked = []  # every tensor check, wherever it runs (wire.decode with expect, or wire.check)
    real_check = wire._check_tensors
    monkeypatch.setattr(wire, "_check_tensors", lambda tensors, spec, extra: checked.append(sorted(spec))
                        or real_check(tensors, spec, extra))
    bottom = cut.part(adapter_state(model), CLIENT)
    ins = Message(bottom, {"kind": "split_fit_ins", "round": 1, "cut_layer": cut.layer, "u_shaped": False,
                           "wire_dtype": "float32"})
    if nan_at_step is None:
        reply = client(ins)
        assert reply.kind == "fit_res" and reply.meta["steps"] == 3
        assert checked == [["grad"]] * 3  # one check of each step's gradient, none twice
    else:
        with pytest.raises(WireError, match="NaN"):
            client(ins)
        assert checked == [["grad"]] * nan_at_step  # the bad gradient was checked, and refused, before its step
