"""FedBPT and the inference-only model service: the client holds no weights, CMA-ES distributions aggregate as
specified, the gRPC service refuses unauthenticated and malformed calls and keeps serving, in-process and gRPC
answers are equal, and a tiny end-to-end run."""

from __future__ import annotations

import json
import os
import types

import grpc
import pytest
import torch

from fedtune import config as cfg
from fedtune import experiment
from fedtune.data.tasks import collate
from fedtune.experiment import prepare_data
from fedtune.model_service import LocalModelService, ModelAPI, ModelServer
from fedtune.paradigms import fedbpt as bpt
from fedtune.progress import Bars
from fedtune.runtime import model_client as mc
from fedtune.runtime import model_service as ms
from fedtune.runtime import split_auth as auth
from fedtune.wire import Message, WireError, encode

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
SMALL = ["model.name=tiny-llama", "data.demo_train_size=60", "data.demo_test_size=12", "federation.num_clients=2",
         "federation.clients_per_round=2", "federation.rounds=2", "federation.paradigm=fedbpt", "train.batch_size=4",
         "eval.max_examples=12", "fedbpt.iterations=3", "fedbpt.popsize=4", "fedbpt.intrinsic_dim=16",
         "data.max_length=64"]


@pytest.fixture(scope="module")
def small(tiny):
    c = cfg.load(None, SMALL)
    return c, prepare_data(c, tiny[1], Bars(quiet=True))


@pytest.fixture(scope="module")
def tokens():
    return {i: os.urandom(16).hex() for i in ("node-0", "node-1", "fed-server")}


@pytest.fixture(scope="module")
def grpc_service(tiny, tokens):
    """The model service on 127.0.0.1 in this process (its own thread pool), tokens required."""
    service = ms.ModelService(ModelServer(tiny[0], CPU), tokens=tokens, mtls=False)
    server, port = ms.start_server(service, "127.0.0.1:0", auth.ServerSecurity(tokens=tokens))
    yield f"127.0.0.1:{port}"
    server.stop(grace=None).wait(10)


def api_for(address, identity, token):
    return ModelAPI(mc.grpc_transport(address, auth.Credentials(identity, token=token), timeout=30))


def request(data, pad_id, n=3, hidden=64):
    batch = collate(data.train[:4], pad_id)
    soft = torch.randn(n, 5, hidden, generator=torch.Generator().manual_seed(0)) * 0.02
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                soft_prompt=soft, prompt_ids=torch.tensor([10, 11, 12, 13, 14]), last=batch["last"],
                candidates=torch.tensor([5, 6, 7]), top_k=4)


def reachable(root, stop_types=()):
    """What `root` holds: objects reachable through instance attributes, containers, bound methods and closure
    cells (not module globals, which every function can name), stopping at `stop_types`."""
    seen, todo, out = set(), [root], []
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), type, types.ModuleType)):
            continue
        seen.add(id(obj))
        out.append(obj)
        if isinstance(obj, stop_types):
            continue
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif isinstance(obj, types.MethodType):
            todo.extend([obj.__self__, obj.__func__])
        elif isinstance(obj, types.FunctionType):
            todo.extend(c.cell_contents for c in (obj.__closure__ or ()) if c.cell_contents is not None)
            todo.extend(obj.__defaults__ or ())
        elif hasattr(obj, "__dict__"):
            todo.append(vars(obj))
        elif isinstance(obj, torch.Tensor):
            pass
    return out


def test_in_process_and_grpc_answers_are_equal(tiny, small, grpc_service, tokens):
    c, data = small
    local = LocalModelService(tiny[0], CPU).connect("node-0")
    remote = api_for(grpc_service, "node-0", tokens["node-0"])
    req = request(data, tiny[1].pad_token_id)
    a, b = local.infer(**req), remote.infer(**req)
    assert set(a) == {"loss", "scores", "top_values", "top_ids"} and a["loss"].shape == (3, 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert local.bytes_up == remote.bytes_up and local.bytes_down == remote.bytes_down
    assert local.info() == remote.info()
    # A zero soft prompt is the text of prompt_ids, placed before the input.
    zero = local.infer(**{**req, "soft_prompt": torch.zeros(1, 5, 64), "top_k": 0})
    ids = torch.cat([torch.tensor([[10, 11, 12, 13, 14]] * 4), req["input_ids"]], 1)
    with torch.no_grad():
        logits = tiny[0](input_ids=ids, attention_mask=torch.cat([torch.ones(4, 5, dtype=torch.long),
                                                                  req["attention_mask"]], 1)).logits
    expect = logits[torch.arange(4), req["last"] + 5][:, [5, 6, 7]]
    torch.testing.assert_close(zero["scores"][0], expect, rtol=1e-5, atol=1e-5)


def test_the_service_refuses_unauthenticated_and_malformed_calls_and_keeps_serving(small, tiny, grpc_service, tokens):
    c, data = small
    req = request(data, tiny[1].pad_token_id)
    for creds in (auth.Credentials("node-0"), auth.Credentials("node-0", token=tokens["node-1"]),
                  auth.Credentials("", token=tokens["node-0"])):
        with pytest.raises(mc.ModelServiceError, match="UNAUTHENTICATED"):
            ModelAPI(mc.grpc_transport(grpc_service, creds, timeout=30)).info()
    good = api_for(grpc_service, "node-1", tokens["node-1"])
    bad = [({**req, "input_ids": req["input_ids"] + 10**6}, "input_ids must be token ids"),
           ({**req, "soft_prompt": torch.zeros(1, 5, 63)}, "soft_prompt must have shape"),
           ({**req, "soft_prompt": torch.full((1, 5, 64), float("nan"))}, "finite|NaN"),
           ({**req, "top_k": 1000}, "top_k"),
           ({**req, "last": req["last"] + 999}, "last must be positions")]
    for kwargs, why in bad:
        with pytest.raises(mc.ModelServiceError, match=f"INVALID_ARGUMENT: rejected: .*({why})"):
            good.infer(**kwargs)
    transport = mc.grpc_transport(grpc_service, auth.Credentials("node-1", token=tokens["node-1"]), timeout=30)
    with pytest.raises(mc.ModelServiceError, match="INVALID_ARGUMENT"):
        transport("Infer", b"not a safetensors payload")
    with pytest.raises(mc.ModelServiceError, match="INVALID_ARGUMENT.*unexpected tensors"):
        transport("Infer", encode(Message({"weights": torch.zeros(2)}, {"kind": "infer"})))
    with pytest.raises(mc.ModelServiceError, match="unknown method|no method"):
        transport("Weights", b"")
    assert good.infer(**req)["loss"].shape == (3, 4)  # still serving
    info = good.info()
    assert set(info) == {"kind", "hidden_size", "vocab_size", "embedding_std", "max_tokens", "max_top_k"}


def test_the_client_holds_no_weights_and_needs_no_model(tiny, small, grpc_service, tokens):
    c, data = small
    weights = {p.data_ptr() for p in tiny[0].parameters()}
    os.environ[mc.ENV["token_file"]] = str(_token_file(tokens))
    try:
        ctx = types.SimpleNamespace(config=c, model=None, tokenizer=tiny[1], data=data, pad_id=tiny[1].pad_token_id,
                                    client_examples=lambda i: [data.train[j] for j in data.parts[i]],
                                    services=types.SimpleNamespace(model_service=mc.RemoteModelService(grpc_service)))
        clients = bpt.make_clients(ctx)  # no model in the context: clients never need one
        s = bpt.settings_of(c)
        reply = clients[0](Message({"mean": torch.zeros(s.dim)}, {"kind": "fedbpt_ins", "round": 1, "sigma": 1.0}))
    finally:
        del os.environ[mc.ENV["token_file"]]
    assert reply.kind == "fedbpt_res" and reply.meta["api_calls"] == s.iterations  # one Infer a generation
    for obj in reachable(clients[0]):
        assert not isinstance(obj, (torch.nn.Module, torch.nn.Parameter)), type(obj)
        if isinstance(obj, torch.Tensor):
            assert obj.data_ptr() not in weights
    # In process the transport is the boundary: behind it is the service, which alone holds the model.
    local = bpt.FedBPTClient(0, data.train[:8], s, connect=lambda n: LocalModelService(tiny[0], CPU).connect("node-0"),
                             prompt_ids=[10, 11], pad_id=tiny[1].pad_token_id)
    local(Message({"mean": torch.zeros(s.dim)}, {"kind": "fedbpt_ins", "round": 1, "sigma": 1.0}))
    for obj in reachable(local, stop_types=(types.FunctionType,)):
        assert not isinstance(obj, (torch.nn.Module, torch.nn.Parameter, LocalModelService)), type(obj)


def _token_file(tokens):
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    for ident, tok in tokens.items():
        (folder / f"{ident}.token").write_text(tok)
    return folder / "{identity}.token"


def test_cma_es_distributions_aggregate_as_example_weighted_means():
    updates = [(torch.tensor([1.0, 0.0]), 0.5, 10), (torch.tensor([0.0, 2.0]), 1.0, 30)]
    mean, sigma = bpt.aggregate(updates)
    torch.testing.assert_close(mean, torch.tensor([0.25, 1.5]))
    assert sigma == pytest.approx(0.875)
    with pytest.raises(WireError, match="sigma"):
        bpt.read_update(Message({"mean": torch.zeros(2)}, {"kind": "fedbpt_res", "sigma": -1.0}), 2)


def test_config_errors_name_the_field():
    with pytest.raises(cfg.ConfigError, match="fedbpt.popsize"):
        cfg.load(None, [*SMALL, "fedbpt.popsize=1"])
    with pytest.raises(cfg.ConfigError, match="classification"):
        cfg.load(None, [*SMALL, "data.task=generation"])


def test_end_to_end_run_reports_access_and_api_traffic(tmp_path):
    summary = experiment.run(cfg.load(None, SMALL), tmp_path, quiet=True)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["access"] == "black" and saved["backprop"] is False
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in records if r["type"] == "client"]
    assert len(clients) == 4 and all(r["status"] == "ok" and r["api_bytes_up"] > 0 for r in clients)
    pm = saved["paradigm_metrics"]
    assert pm["api_bytes_up_total"] == sum(r["api_bytes_up"] for r in clients)
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in clients) < pm["api_bytes_up_total"]
    assert (tmp_path / "prompt.safetensors").exists() and summary["server_flops"] > 0
