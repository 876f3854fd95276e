"""Batched clients (runtime.batch_clients): K clients' LoRA in one pass give each client's sequential result."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from fedtune import config as cfg
from fedtune.data.tasks import Example, collate
from fedtune.experiment import prepare_data, run
from fedtune.train.losses import lm_loss
from fedtune.models import attach_lora, tiny_llama_config
from fedtune.train.stacked_lora import StackedLora, combine, lora_layers
from fedtune import registry
from fedtune.paradigms.fedpeft_batched import BatchedFedPeft
from fedtune.paradigms import fedpeft
from fedtune.progress import Bars
from fedtune.runtime.local import BatchedLocalGrid
from fedtune.train.step_runner import pad_to_bucket
from fedtune.wire import Message, WireError
from fedtune.train.adapter import adapter_state, load_adapter_state
from fedtune.train.local_steps import TrainSettings
from fedtune.train.step_runner import make_runner

SMALL = ["model.name=tiny-llama", "data.demo_train_size=60", "data.demo_test_size=12", "federation.num_clients=4",
         "federation.clients_per_round=4", "federation.rounds=1", "train.local_steps=2", "train.batch_size=4",
         "train.lr=0.01", "eval.base=false"]


@pytest.fixture(scope="module")
def tiny64(tiny):
    """A float64 copy of the tiny base: rounding then vanishes and equal means equal to 1e-12."""
    base, tok = tiny
    return copy.deepcopy(base).double(), tok


def prepared(base, tok):
    c = cfg.load(None, SMALL)
    data = prepare_data(c, tok, Bars(quiet=True))
    model = attach_lora(base, c.peft, c.seed)
    if base.dtype == torch.float64:  # peft keeps float32 adapters unless told; a bfloat16 base keeps them too
        model = model.double()
    return model, tok, data


@pytest.fixture()
def setup(tiny):
    model, tok, data = prepared(*tiny)
    yield model, tok, data
    model.unload()


@pytest.fixture(params=["float32", "float64", "bfloat16"])
def setup_dtype(request, tiny):
    base, tok = tiny
    if request.param == "float64":
        base, tok = request.getfixturevalue("tiny64")
    elif request.param == "bfloat16":
        base = copy.deepcopy(base).to(torch.bfloat16)
    model, tok, data = prepared(base, tok)
    yield model, tok, data
    model.unload()


def random_states(model, k: int) -> list[dict[str, torch.Tensor]]:
    """K different adapter states with non-zero B, so every LoRA weight gets a gradient."""
    g = torch.Generator().manual_seed(7)
    init = adapter_state(model)
    return [{key: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for key, v in init.items()}
            for _ in range(k)]


def sequential_grads(model, state, batch):
    load_adapter_state(model, state)
    model.zero_grad(set_to_none=True)
    loss, _ = lm_loss(model, batch)
    loss.backward()
    loss = float(loss.detach())
    named = dict(model.named_parameters())
    grads = {}
    for name in lora_layers(model):
        for ab in "AB":
            grads[f"{name}.lora_{ab}.weight"] = named[f"{name}.lora_{ab}.default.weight"].grad.clone()
    model.zero_grad(set_to_none=True)
    return loss, grads


# Samples per client (None: the client sits the step out). Ragged counts use the per-sample gather path,
# equal counts the grouped path (over all slots, or over a subset of them).
@pytest.mark.parametrize("sizes", [(2, 3, None, 1), (2, 2, 2), (3, None, 3)], ids=["gather", "grouped", "subset"])
def test_batched_gradients_equal_each_clients_own(setup_dtype, sizes):
    """In float32 the batch shapes round differently (gradients up to ~0.5, differences up to ~4e-6);
    in float64 only the cross-entropy, which `lm_loss` computes in float32, rounds, so the check is 1e-9.
    A bfloat16 base (float32 adapters, as peft keeps them) rounds to ~1e-3 (measured 8e-4)."""
    model, tok, data = setup_dtype
    tol = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 4e-3}[model.get_base_model().dtype]
    loss_tol = 5e-3 if tol > 1e-5 else 2e-6
    model.train()
    states = random_states(model, len(sizes))
    # Different examples per client (different prompt lengths, so different padding in each batch).
    per_client, start = [], 0
    for n in sizes:
        per_client.append(None if n is None else collate(data.train[start: start + n], tok.pad_token_id))
        start += n or 0
    assert len({b["input_ids"].shape[1] for b in per_client if b is not None}) > 1, "want ragged widths"
    expected = {k: sequential_grads(model, states[k], b) for k, b in enumerate(per_client) if b is not None}

    stacked = StackedLora(model, states)
    batch, routing = combine(per_client, tok.pad_token_id)
    with stacked:
        loss, means = stacked.loss(batch, routing)
        loss.backward()
    for (slot, _), mean in zip(routing.groups, means.detach()):
        assert abs(float(mean) - expected[slot][0]) < loss_tol * expected[slot][0]
    for slot, n in enumerate(sizes):
        for key, grad in expected.get(slot, (None, {}))[1].items():
            name, ab = key.rsplit(".lora_", 1)
            table = stacked.A if ab.startswith("A") else stacked.B
            torch.testing.assert_close(table[name].grad[slot], grad, atol=tol, rtol=0)
        if n is None:  # a client that sat out gets no gradient at all
            assert all(float(p.grad[slot].abs().max()) == 0.0 for p in stacked.params)
    # Leaving the block restores peft's own forward: the sequential loss is unchanged.
    again, _ = sequential_grads(model, states[0], per_client[0])
    assert again == expected[0][0]
    model.eval()


def test_static_batched_loss_gives_each_client_its_own_loss_and_gradients(setup):
    """The static pass's loss (right-padded to a bucket, no mask, fixed-shape per-client means), float32."""
    model, tok, data = setup
    model.train()
    k, b = 3, 2
    states = random_states(model, k)
    per_client = [collate(data.train[i * b: (i + 1) * b], tok.pad_token_id) for i in range(k)]
    assert len({x["input_ids"].shape[1] for x in per_client}) > 1, "want ragged widths"
    expected = [sequential_grads(model, state, x) for state, x in zip(states, per_client)]
    combined, _ = combine(per_client, tok.pad_token_id)
    static = pad_to_bucket(combined, 64, tok.pad_token_id)
    assert static["input_ids"].shape[1] % 64 == 0 and static["input_ids"].shape[1] > combined["input_ids"].shape[1]
    stacked = StackedLora(model, states)
    with stacked:
        stacked.route_all(b)
        total, means = stacked.static_loss(model, static["input_ids"], static["labels"])
        total.backward()
    model.eval()
    assert means.shape == (k,)
    for slot, (loss, grads) in enumerate(expected):
        assert float(means[slot].detach()) == pytest.approx(loss, rel=2e-6)
        for key, grad in grads.items():
            name, ab = key.rsplit(".lora_", 1)
            table = stacked.A if ab.startswith("A") else stacked.B
            torch.testing.assert_close(table[name].grad[slot], grad, atol=1e-5, rtol=0)
    assert float(total) == pytest.approx(sum(loss for loss, _ in expected), rel=2e-6)


def test_static_loss_refuses_a_batch_it_is_not_routed_for(setup):
    model, _, _ = setup
    stacked = StackedLora(model, random_states(model, 2))
    ids = torch.ones(4, 8, dtype=torch.long)
    with stacked, pytest.raises(RuntimeError, match="route_all"):
        stacked.route_all(1)  # routes 2 samples, the batch has 4
        stacked.static_loss(model, ids, ids)


def test_load_in_place_keeps_the_parameters_and_checks_every_state_first(setup):
    model, _, _ = setup
    first, second = random_states(model, 2), random_states(model, 3)[1:]
    stacked = StackedLora(model, first)
    addresses = [p.data_ptr() for p in stacked.params]
    shared = [second[0], second[0]]  # the same tensors for both slots: one broadcast copy
    for states in (second, shared):
        stacked.load_(states)
        assert [p.data_ptr() for p in stacked.params] == addresses
        for slot, state in enumerate(states):
            assert all(torch.equal(stacked.state(slot)[k], v) for k, v in state.items())
    before = stacked.states()
    bad = {k: v[..., :1].clone() for k, v in first[0].items()}
    with pytest.raises(WireError, match="shape"):
        stacked.load_([first[0], bad])
    with pytest.raises(ValueError, match="holds 2 clients"):
        stacked.load_(first + first)
    # A refused load changed nothing.
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, stacked.states()) for k in a)


def make_apps(model, tok, data, **settings):
    s = TrainSettings(**{"local_steps": 3, "local_epochs": None, "batch_size": 4, "lr": 0.01,
                                 "count_flops": False, **settings})
    return {i: fedpeft.FedPeftClient(i, model, [data.train[j] for j in data.parts[i]], s, device=torch.device("cpu"),
                                     pad_id=tok.pad_token_id, seed=3)
            for i in range(len(data.parts))}


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("settings", [
    dict(weight_decay=0.1, max_grad_norm=0.05),  # AdamW, decoupled weight decay, clipping that bites
    dict(optimizer="sgd", prox_mu=0.5, max_grad_norm=None),  # FedProx
    dict(local_steps=None, local_epochs=0.4, batch_size=2),  # different step counts per client
], ids=["adamw-clip", "fedprox-sgd", "epochs"])
def test_batched_clients_end_where_each_client_alone_ends(tiny64, settings, static):
    """In float64, so that equal means equal (measured: 1e-13). In float32 AdamW turns the ~1e-7 rounding of
    near-zero gradient elements into differences up to ~5e-4 after 3-4 steps at lr 0.01 (SGD: ~1e-8).
    The static pass (CUDA graphs' math, run without graphs here) applies when every client takes the same
    steps; with different step counts it falls back to the eager pass."""
    model, tok, data = prepared(*tiny64)
    try:
        # Clients of different sizes, so local_epochs gives them different numbers of steps.
        data.parts = [data.parts[0][:4], data.parts[1], data.parts[2][:7], data.parts[3]]
        apps = make_apps(model, tok, data, **settings)
        init = adapter_state(model)
        messages = [Message(init, {"kind": "fit_ins", "round": 2, "dst": i}) for i in apps]
        alone = [apps[i](m) for i, m in zip(apps, messages)]
        batched = BatchedFedPeft(apps, static=static)
        together = batched(messages)
    finally:
        model.unload()
    if "local_epochs" in settings:
        assert len({r.meta["steps"] for r in alone}) > 1
    assert list(batched.passes) == ([4] if static and "local_epochs" not in settings else [])
    for a, b in zip(alone, together):
        for key in ("src", "num_examples", "examples_seen", "steps"):
            assert a.meta[key] == b.meta[key], key
        for key in ("train_loss", "train_loss_first", "train_loss_last"):
            assert abs(a.meta[key] - b.meta[key]) < 1e-5, key
        assert set(a.tensors) == set(b.tensors)
        for key in a.tensors:
            torch.testing.assert_close(b.tensors[key], a.tensors[key], atol=1e-10, rtol=0)
        assert max(float((a.tensors[k] - init[k]).abs().max()) for k in init) > 1e-3  # it really trained


@pytest.mark.parametrize("settings", [
    dict(optimizer="sgd", max_grad_norm=0.05, prox_mu=0.5, lr=0.5),  # clipping that bites, FedProx
    dict(weight_decay=0.1, max_grad_norm=None, lr=1e-3),  # AdamW: its first steps are sign-like, so small lr
], ids=["sgd-clip-prox", "adamw"])
def test_static_pass_in_float32_ends_where_each_client_alone_ends(setup, settings):
    """The static pass against `FedPeftClient` alone in float32, run twice on the same buffers: the second
    pass (new states, a new round) loads them in place and starts a fresh optimizer."""
    model, tok, data = setup
    apps = make_apps(model, tok, data, **settings)
    batched = BatchedFedPeft(dict(list(apps.items())[:3]), static=True)
    for rnd, states in ((1, random_states(model, 3)), (2, random_states(model, 4)[1:])):
        messages = [Message(state, {"kind": "fit_ins", "round": rnd, "dst": i}) for i, state in enumerate(states)]
        together = batched(messages)
        fresh = make_apps(model, tok, data, **settings)  # new optimizers: nothing left from the first round
        alone = [fresh[i](m) for i, m in enumerate(messages)]
        if rnd == 1:
            stacked, runner = batched.passes[3]
            params, optimizer = [p.data_ptr() for p in stacked.params], runner.optimizer
        assert list(batched.passes) == [3] and batched.passes[3][1].optimizer is optimizer
        assert [p.data_ptr() for p in batched.passes[3][0].params] == params
        for a, b, state in zip(alone, together, states):
            for key in ("steps", "examples_seen", "num_examples"):
                assert a.meta[key] == b.meta[key], key
            for key in ("train_loss", "train_loss_first", "train_loss_last"):
                assert b.meta[key] == pytest.approx(a.meta[key], rel=1e-5), key
            for key in a.tensors:
                torch.testing.assert_close(b.tensors[key], a.tensors[key], atol=1e-5, rtol=0)
            assert max(float((a.tensors[k] - state[k]).abs().max()) for k in state) > 1e-4  # it trained


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_graph_pass_ends_where_each_client_alone_ends(device):
    """The static pass as it runs on a GPU (CUDA graphs: captured, then replayed for later steps and passes)
    against each client alone through the sequential path (its own CUDA graphs), in float32 with SGD and
    clipping; on the CPU the same test runs both without graphs. A random tiny Llama, no tokenizer needed."""
    torch.manual_seed(0)
    vocab, k = 512, 3
    base = LlamaForCausalLM(tiny_llama_config(vocab)).to(device).eval()
    base.requires_grad_(False)
    model = attach_lora(base, cfg.PeftConfig(r=4, alpha=8), seed=0)
    g = torch.Generator().manual_seed(1)
    rows = [[Example(torch.randint(1, vocab, (int(n) - 6,), generator=g).tolist(),
                     torch.randint(1, vocab, (6,), generator=g).tolist())
             for n in torch.randint(40, 60, (8,), generator=g)] for _ in range(k)]  # one bucket: 64
    s = TrainSettings(local_steps=3, local_epochs=None, batch_size=2, lr=0.5, optimizer="sgd",
                              max_grad_norm=0.05, count_flops=False)
    dev = torch.device(device)
    runner = make_runner(model, s, device=dev, pad_id=0)
    apps = {i: fedpeft.FedPeftClient(i, model, r, s, device=dev, pad_id=0, seed=0, runner=runner)
            for i, r in enumerate(rows)}
    batched = BatchedFedPeft(apps)
    assert batched.static == (device == "cuda")
    batched.static = True  # on the CPU: the same static pass, without graphs
    for rnd in (1, 2):  # the second pass replays the graphs captured in the first
        states = random_states(model, k + rnd)[rnd:]
        messages = [Message(state, {"kind": "fit_ins", "round": rnd, "dst": i}) for i, state in enumerate(states)]
        together = batched(messages)
        alone = [apps[i](m) for i, m in enumerate(messages)]
        for a, b, state in zip(alone, together, states):
            assert b.meta["train_loss"] == pytest.approx(a.meta["train_loss"], rel=1e-5)
            for key in state:
                torch.testing.assert_close(b.tensors[key], a.tensors[key], atol=1e-5, rtol=0)
            assert max(float((a.tensors[key] - state[key]).abs().max()) for key in state) > 1e-4
    stacked_runner = batched.passes[k][1]
    assert stacked_runner.graph_failure is None and runner.graph_failure is None
    assert stacked_runner.captured_shapes == runner.captured_shapes == (1 if device == "cuda" else 0)
    model.unload()


def test_batched_flops_per_client_are_close_to_each_client_alone(setup):
    model, tok, data = setup
    apps = make_apps(model, tok, data, local_steps=1, count_flops=True)
    init = adapter_state(model)
    messages = [Message(init, {"kind": "fit_ins", "round": 1, "dst": i}) for i in apps]
    alone = sum(apps[i](m).meta["flops"] for i, m in zip(apps, messages))
    replies = BatchedFedPeft(apps)(messages)
    together = sum(r.meta["flops"] for r in replies)
    # The shared pass does the same matmuls plus the other clients' padding: close to the sum alone, not below it.
    assert alone <= together < 1.5 * alone
    assert all(r.meta["flops"] > 0 and r.meta["batched_clients"] == 4 for r in replies)


def test_grid_batches_in_groups_and_a_failing_client_fails_alone(setup):
    model, tok, data = setup
    apps = make_apps(model, tok, data, local_steps=1)
    batched = BatchedFedPeft(apps)
    groups = []

    def run_batch(msgs):
        groups.append([m.meta["dst"] for m in msgs])
        return batched(msgs)

    init = adapter_state(model)
    bad = {k: v[..., :1].clone() for k, v in init.items()}  # wrong shapes: this client must fail, alone
    messages = [Message(bad if i == 1 else init, {"kind": "fit_ins", "round": 1, "dst": i}) for i in apps]
    messages.append(Message(init, {"kind": "fit_ins", "round": 1, "dst": 99}))
    grid = BatchedLocalGrid(apps, run_batch, 3)
    assert grid.parallel
    with pytest.warns(RuntimeWarning, match="running them one by one"):
        replies = grid.send_and_receive(messages)
    assert groups == [[0, 1, 2], [3]]
    assert [r.meta["kind"] for r in replies] == ["fit_res", "error", "fit_res", "fit_res", "error"]
    alone = apps[2](messages[2])
    for key in init:
        torch.testing.assert_close(replies[2].tensors[key], alone.tensors[key], atol=1e-5, rtol=0)


def adapter(folder):
    return load_file(folder / "adapter" / "adapter_model.safetensors")


@pytest.mark.filterwarnings("error:batched run:RuntimeWarning")  # a fallback to one-by-one would prove nothing
def test_experiment_with_batched_clients_matches_one_at_a_time(tiny, tmp_path):
    # SGD: AdamW divides by sqrt(v), which turns float32 rounding on near-zero gradients into 1e-5 differences
    # (its equivalence is checked in float64 above); SGD keeps the whole run comparable at 1e-6.
    common = SMALL + ["federation.num_clients=5", "federation.clients_per_round=4", "federation.rounds=2",
                      "train.max_grad_norm=0.5", "federation.paradigm=fedprox", "federation.prox_mu=0.1",
                      "train.optimizer=sgd", "train.lr=0.5"]
    one = run(cfg.load(None, common), out=tmp_path / "one", quiet=True)
    three = run(cfg.load(None, common + ["runtime.batch_clients=3"]), out=tmp_path / "three", quiet=True)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "three")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3  # trained, not the init
    assert one["accuracy"] == three["accuracy"]
    records = [json.loads(line) for line in (tmp_path / "three" / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in records if r["type"] == "client"]
    # 4 clients a round in groups of 3: a pass of 3 and a pass of 1, every client ok.
    assert sorted(r["batched_clients"] for r in clients) == [1, 1, 3, 3, 3, 3, 3, 3]
    assert all(r["status"] == "ok" for r in clients)


@pytest.mark.parametrize("paradigm", ["kd", "split", "centralized"])
def test_batch_clients_rejected_where_it_does_not_apply(paradigm):
    with pytest.raises(cfg.ConfigError, match=r"runtime\.batch_clients = 2.*fedpeft or fedprox"):
        cfg.load(None, SMALL + [f"federation.paradigm={paradigm}", "runtime.batch_clients=2"])


def test_batched_clients_refuse_apps_they_cannot_batch(setup):
    model, tok, data = setup
    with pytest.raises(ValueError, match=r"runtime.batch_clients.*FedLLM"):
        registry.get("fedpeft").batched({0: lambda m: m})
    centralized = make_apps(model, tok, data)
    centralized[0].persistent_optimizer = True
    with pytest.raises(ValueError, match=r"runtime.batch_clients.*centralized"):
        BatchedFedPeft(centralized)


def test_batched_clients_refuse_adapters_other_than_plain_lora(tiny):
    base, _ = tiny
    dora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    try:
        with pytest.raises(ValueError, match=r"runtime.batch_clients > 1 trains plain LoRA"):
            lora_layers(dora)
    finally:
        dora.unload()


def test_leaving_the_block_restores_peft_forward_even_after_an_error(setup):
    model, tok, data = setup
    batch = collate(data.train[:2], tok.pad_token_id)
    with torch.no_grad():
        before, _ = lm_loss(model, batch)
    values = adapter_state(model)
    stacked = StackedLora(model, random_states(model, 2))
    layers = lora_layers(model)
    with pytest.raises(RuntimeError, match="without routing"), stacked:
        assert all("forward" in layer.__dict__ for layer in layers.values())
        model(input_ids=torch.tensor([[1, 2, 3]]))  # the model called directly has no routing
    assert not any("forward" in layer.__dict__ for layer in layers.values())
    with torch.no_grad():
        after, _ = lm_loss(model, batch)
    assert float(before) == float(after)
    assert all(torch.equal(v, adapter_state(model)[k]) for k, v in values.items())


def test_benchmark_runs_and_reports_equal_gradients():
    """The micro-benchmark (benchmarks/batched_clients.py) on CPU at its smallest: it runs and its check holds."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "batched_clients.py"
    spec = importlib.util.spec_from_file_location("batched_clients", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for path in ("auto", "static"):
        results = bench.main(["--device", "cpu", "--models", "tiny", "--clients", "3", "--batch-sizes", "2",
                              "--seq", "40", "--steps", "2", "--rounds", "1", "--batched-path", path])
        (r,) = results
        assert r["clients"] == 3 and r["sequential_steps_per_s"] > 0 and r["batched_steps_per_s"] > 0
        assert 0 < r["max_grad_diff"] < 1e-5 * max(1.0, r["max_grad"])
        assert r["batched_path"] == {"auto": "eager", "static": "static"}[path]  # no graphs on the CPU
        assert r["max_adapter_diff"] < 1e-3 * r["max_update"]
