"""Clients of different LoRA ranks (peft.client_ranks) and rank-aware aggregation (peft.aggregation) on tiny-llama."""

from __future__ import annotations

import pytest
import torch

from fedtune import config as cfg
from fedtune import lora_aggregation as la
from fedtune.experiment import prepare_data
from fedtune.models import attach_lora
from fedtune.paradigms import fedpeft
from fedtune.paradigms.fedpeft_ranks import FlexLoRA, ZeroPad, serve_ranks
from fedtune.progress import Bars
from fedtune.rounds import ServerHooks
from fedtune.runtime.local import LocalGrid
from fedtune.strategies import FedAvg
from fedtune.train.adapter import adapter_state
from fedtune.train.local_steps import TrainSettings
from fedtune.wire import Message

SMALL = ["model.name=tiny-llama", "data.demo_train_size=24", "data.demo_test_size=4", "federation.num_clients=2",
         "federation.clients_per_round=2", "federation.rounds=1", "train.local_steps=2", "train.batch_size=2",
         "eval.base=false", "data.max_length=96", "peft.r=4"]


@pytest.fixture(scope="module")
def setup(tiny, one_thread):
    base, tok = tiny
    c = cfg.load(None, SMALL)
    data = prepare_data(c, tok, Bars(quiet=True))
    model = attach_lora(base, c.peft, c.seed)
    yield model, tok, data
    model.unload()


def client(i, model, tok, data, rank=None):
    s = TrainSettings(local_steps=2, local_epochs=None, batch_size=2, lr=0.05, count_flops=False)
    return fedpeft.FedPeftClient(i, model, [data.train[j] for j in data.parts[i]], s, device=torch.device("cpu"),
                                 pad_id=tok.pad_token_id, seed=0, rank=rank)


def hooks(log):
    return ServerHooks(evaluate=lambda s: 0.0, log=log.append, save=lambda s, r: None, bars=Bars(quiet=True))


def test_a_lower_rank_client_trains_exactly_its_rank(setup):
    model, tok, data = setup
    init = adapter_state(model)
    low = client(0, model, tok, data, rank=2)(Message(la.truncate(init, 2), {"round": 1, "dst": 0})).tensors
    assert la.rank_of(low) == 2
    # The same client on a shared model whose components 2..3 start at zero trains the same first two
    # components (the zero ones get zero gradients): a rank-2 LoRA, padded.
    padded = client(0, model, tok, data)(Message(la.zero_pad(la.truncate(init, 2), 4), {"round": 1, "dst": 0}))
    full = padded.tensors
    for k in low:
        torch.testing.assert_close(la.truncate(full, 2)[k], low[k], rtol=0, atol=0)
    for p in la.modules(full):
        assert not full[p + la.A_SUFFIX][2:].any() and not full[p + la.B_SUFFIX][:, 2:].any()


def test_zero_padding_is_exactly_separate_averaging_for_equal_ranks(setup):
    model, tok, data = setup
    init = adapter_state(model)
    apps = {i: client(i, model, tok, data) for i in (0, 1)}
    plain, _ = fedpeft.serve(LocalGrid(apps), init, FedAvg(), rounds=2, clients_per_round=2, seed=0, eval_every=9,
                             hooks=hooks([]))
    ranked_apps = {i: client(i, model, tok, data, rank=4) for i in (0, 1)}
    log: list[dict] = []
    padded, _ = serve_ranks(LocalGrid(ranked_apps), init, ZeroPad(FedAvg(), 4), {0: 4, 1: 4}, rounds=2,
                            clients_per_round=2, seed=0, eval_every=9, hooks=hooks(log))
    for k in init:
        assert torch.equal(plain[k], padded[k])
    gaps = [r["separate_gap"] for r in log if r["type"] == "lora_aggregation"]
    assert len(gaps) == 2 and all(g >= 0 for g in gaps)


def test_flexlora_with_rank_one_clients_holds_the_exact_mean_product(setup):
    model, tok, data = setup
    init = adapter_state(model)
    apps = {i: client(i, model, tok, data, rank=1) for i in (0, 1)}
    # The clients' replies, computed independently, and the mean of their products by hand.
    replies = {i: app(Message(la.truncate(init, 1), {"round": 1, "dst": i})) for i, app in apps.items()}
    n = {i: replies[i].meta["num_examples"] for i in apps}
    log: list[dict] = []
    final, _ = serve_ranks(LocalGrid(apps), init, FlexLoRA(4), {0: 1, 1: 1}, rounds=1, clients_per_round=2, seed=0,
                           eval_every=9, hooks=hooks(log))
    assert la.rank_of(final) == 4
    for p in la.modules(init):
        b = {i: replies[i].tensors[p + la.B_SUFFIX] for i in apps}
        a = {i: replies[i].tensors[p + la.A_SUFFIX] for i in apps}
        exact = (n[0] * b[0] @ a[0] + n[1] * b[1] @ a[1]) / (n[0] + n[1])
        got = final[p + la.B_SUFFIX] @ final[p + la.A_SUFFIX]  # rank 4 >= 2 rank-1 clients: exact
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-6)
    bytes_up = [r["bytes_up"] for r in log if r["type"] == "client"]
    full_bytes = sum(4 * v.numel() for v in init.values())
    assert all(b < full_bytes / 2 for b in bytes_up)  # a rank-1 reply is a quarter of the rank-4 values


@pytest.mark.parametrize("overrides, match", [
    (["peft.client_ranks=[2,8]"], "between 1 and peft.r"),
    (["peft.client_ranks=[2,4]"], "cannot average adapters of different ranks"),
    (["peft.client_ranks=[2,4]", "peft.aggregation=flexlora", "federation.strategy=fedadam"], "not supported"),
    (["peft.aggregation=zero_pad", "peft.method=dora"], "plain LoRA"),
    (["peft.aggregation=zero_pad", "federation.paradigm=kd"], "fedpeft or fedprox, not .kd."),
])
def test_rank_configurations_that_cannot_run_are_refused(overrides, match):
    with pytest.raises(cfg.ConfigError, match=match):
        cfg.load(None, SMALL + overrides)


@pytest.mark.parametrize("other", ["privacy.dp=central", "secagg.enabled=true"])
def test_rank_aware_runs_refuse_privacy_and_secure_aggregation_by_name(other):
    from fedtune import config as cfg

    with pytest.raises(cfg.ConfigError, match=other.split("=")[0].replace(".", r"\.") + " does not apply"):
        cfg.load(None, ["model.name=tiny-llama", "peft.client_ranks=[2,4]", "peft.aggregation=zero_pad", other])
