"""Every PEFT method (peft.method) federates: a round of 2 clients is the hand-computed weighted mean of their
trainable states; what travels is exactly the trainable state; the saved adapter reloads with
PeftModel.from_pretrained and reproduces the logits; the methods that cannot run somewhere are refused."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from fedtune import config as cfg
from fedtune.experiment import prepare_data
from fedtune.models import attach_lora, load_base
from fedtune.paradigms import fedpeft
from fedtune.peft_methods import METHODS, PROMPT_LEARNING
from fedtune.progress import Bars
from fedtune.rounds import ServerHooks
from fedtune.runtime.local import LocalGrid
from fedtune.strategies import FedAvg
from fedtune.train.adapter import adapter_state
from fedtune.train.local_steps import TrainSettings
from fedtune.wire import Message

SMALL = ["model.name=tiny-llama", "data.demo_train_size=24", "data.demo_test_size=4", "federation.num_clients=2",
         "federation.clients_per_round=2", "federation.rounds=1", "train.local_steps=1", "train.batch_size=2",
         "eval.base=false", "peft.num_virtual_tokens=3", "peft.encoder_hidden_size=16", "data.max_length=96"]


@pytest.fixture(scope="module")
def data(tiny, one_thread):
    _, tok = tiny
    return prepare_data(cfg.load(None, SMALL), tok, Bars(quiet=True))


def client(i, model, tok, data, lr):
    s = TrainSettings(local_steps=1, local_epochs=None, batch_size=2, lr=lr, count_flops=False)
    return fedpeft.FedPeftClient(i, model, [data.train[j] for j in data.parts[i]], s, device=torch.device("cpu"),
                                 pad_id=tok.pad_token_id, seed=0)


@pytest.mark.parametrize("method", METHODS)
def test_a_round_is_the_weighted_mean_of_the_trainable_states_and_the_adapter_reloads(method, tiny, data, tmp_path):
    base, tok = tiny
    c = cfg.load(None, SMALL + [f"peft.method={method}"])
    ids = torch.tensor([[1, 520, 33, 912, 77, 5, 64]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    model = attach_lora(base, c.peft, c.seed)
    try:
        init = adapter_state(model)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # What travels is exactly what trains: as many values, and (for the injected methods) the same tensors.
        assert sum(v.numel() for v in init.values()) == sum(p.numel() for p in trainable.values()) > 0
        if method == "ffa_lora":
            assert init and all("lora_B" in k for k in init)
        apps = {i: client(i, model, tok, data, lr=0.05) for i in (0, 1)}
        replies = {i: app(Message(init, {"round": 1, "dst": i})) for i, app in apps.items()}
        n = {i: replies[i].meta["num_examples"] for i in apps}
        # Training moved the state, differently on the two clients (LoRA's A stays put for a step while B is 0).
        assert any(not torch.equal(replies[0].tensors[k], replies[1].tensors[k]) for k in init)
        expected = {k: (n[0] * replies[0].tensors[k] + n[1] * replies[1].tensors[k]) / (n[0] + n[1]) for k in init}
        log: list[dict] = []
        hooks = ServerHooks(evaluate=lambda s: 0.0, log=log.append, save=lambda s, r: None, bars=Bars(quiet=True))
        final, _ = fedpeft.serve(LocalGrid(apps, serialize=True), init, FedAvg(), rounds=1, clients_per_round=2,
                                 seed=0, eval_every=1, hooks=hooks)
        for k in init:
            torch.testing.assert_close(final[k], expected[k], rtol=1e-6, atol=1e-7)
        assert any(not torch.equal(final[k], init[k]) for k in init)

        # Saved in PEFT format, reloaded onto the base with PeftModel.from_pretrained: the same logits.
        fedpeft.load_adapter_state(model, final)
        model.eval()
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        model.save_pretrained(tmp_path / "adapter")
    finally:
        model.unload()
    again = PeftModel.from_pretrained(load_base("tiny-llama")[0], tmp_path / "adapter")
    try:
        with torch.no_grad():
            got = again(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain, ref[:, -ids.shape[1]:], atol=1e-4)  # the adapter is what differs
    finally:
        if method not in PROMPT_LEARNING:
            again.unload()


@pytest.mark.parametrize("method", PROMPT_LEARNING)
def test_prompt_learning_hidden_states_match_peft_forward(method, tiny):
    from fedtune.train.losses import hidden_states

    base, _ = tiny
    c = cfg.load(None, SMALL + [f"peft.method={method}"])
    model = attach_lora(base, c.peft, c.seed)
    try:
        ids = torch.tensor([[1, 520, 33, 912, 77], [1, 8, 9, 10, 0]])
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
        with torch.no_grad():
            mine = model.get_output_embeddings()(hidden_states(model, ids, mask))
            theirs = model(input_ids=ids, attention_mask=mask).logits
            plain = model.get_output_embeddings()(base.model(input_ids=ids, attention_mask=mask).last_hidden_state)
        torch.testing.assert_close(mine, theirs[:, -ids.shape[1]:], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mine, plain, atol=1e-4)  # the virtual tokens did act
        with model.disable_adapter(), torch.no_grad():  # the base model's evaluation: no virtual tokens
            torch.testing.assert_close(model.get_output_embeddings()(hidden_states(model, ids, mask)), plain)
    finally:
        model.unload()


@pytest.mark.parametrize("overrides, match", [
    (["peft.method=prefix", "federation.paradigm=split"], "virtual tokens"),
    (["peft.method=prompt", "federation.paradigm=offsite"], "plain LoRA"),
    (["peft.method=ia3", "federation.paradigm=offsite"], "plain LoRA"),
    (["peft.method=dora", "runtime.batch_clients=2"], "plain LoRA only"),
    (["peft.method=prefix", "peft.num_virtual_tokens=0"], "num_virtual_tokens"),
    (["model.quantization=nf4", "model.device=cpu"], "needs a CUDA GPU"),
])
def test_configurations_that_cannot_run_are_refused(overrides, match):
    with pytest.raises(cfg.ConfigError, match=match):
        cfg.load(None, SMALL + overrides)


def test_quantization_on_a_cpu_says_it_needs_cuda():
    with pytest.raises(ValueError, match="needs CUDA"):
        load_base("tiny-llama", quantization="nf4", device="cpu")
