"""The fast client step (fedtune.train.step_runner): its static-shape loss is the masked loss, and a shared runner
behaves like a fresh optimizer per client. The CUDA-graph replay itself is checked in benchmarks/gpu.py on a GPU."""

from __future__ import annotations

import pytest
import torch

from fedtune import config as cfg
from fedtune.data.tasks import collate
from fedtune.experiment import prepare_data
from fedtune.train.losses import lm_loss
from fedtune.models import attach_lora
from fedtune.paradigms import fedpeft
from fedtune.progress import Bars
from fedtune.train.step_runner import StepRunner, pad_to_bucket, static_loss
from fedtune.wire import Message
from fedtune.train.adapter import adapter_state, load_adapter_state
from fedtune.train.local_steps import TrainSettings, make_optimizer
from fedtune.train.step_runner import make_runner

SMALL = ["model.name=tiny-llama", "data.demo_train_size=60", "data.demo_test_size=12", "federation.num_clients=3",
         "federation.clients_per_round=3", "eval.base=false"]


@pytest.fixture()
def setup(tiny):
    base, tok = tiny
    c = cfg.load(None, SMALL)
    data = prepare_data(c, tok, Bars(quiet=True))
    model = attach_lora(base, c.peft, c.seed)
    # A non-zero B, so the adapter changes the outputs and its gradients are not trivially zero.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(name) & 0xFFFF))
    yield c, model, tok, data
    model.unload()


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def test_static_loss_equals_masked_loss_and_gradients(setup):
    _, model, tok, data = setup
    # Examples of different lengths, so the masked batch has real padding.
    examples = sorted(data.train[:40], key=lambda e: len(e.prompt_ids) + len(e.target_ids))[::10][:4]
    lengths = {len(e.prompt_ids) + len(e.target_ids) for e in examples}
    assert len(lengths) > 1
    batch = collate(examples, tok.pad_token_id)
    masked, _ = lm_loss(model, batch)
    static = pad_to_bucket(batch, 64, tok.pad_token_id)
    assert static["input_ids"].shape[1] % 64 == 0 and static["input_ids"].shape[1] >= batch["input_ids"].shape[1]
    unmasked = static_loss(model, static["input_ids"], static["labels"])
    assert unmasked.item() == pytest.approx(masked.item(), rel=1e-5)
    for g_masked, g_static in zip(_grads(model, masked), _grads(model, unmasked)):
        torch.testing.assert_close(g_static, g_masked, rtol=1e-4, atol=1e-6)


def test_pad_to_bucket_pads_right_with_ignored_labels():
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[-100, 6, 7]])}
    out = pad_to_bucket(batch, 4, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100]]
    assert pad_to_bucket(batch, 2, pad_id=0)["input_ids"].shape == (1, 4)


def test_shared_runner_equals_a_fresh_optimizer_per_client(setup):
    _, model, tok, data = setup
    s = TrainSettings(local_steps=3, local_epochs=None, batch_size=4, lr=0.01, count_flops=False)
    init = adapter_state(model)
    shared = make_runner(model, s, device=torch.device("cpu"), pad_id=tok.pad_token_id)

    def client(i, runner=None):
        return fedpeft.FedPeftClient(i, model, [data.train[j] for j in data.parts[i]], s,
                                     device=torch.device("cpu"), pad_id=tok.pad_token_id, seed=0, runner=runner)

    client(0, shared)(Message(init, {"round": 1, "dst": 0}))  # leaves AdamW state behind in the shared runner
    after_shared = client(1, shared)(Message(init, {"round": 1, "dst": 1}))
    alone = client(1)(Message(init, {"round": 1, "dst": 1}))
    for k in init:
        torch.testing.assert_close(after_shared.tensors[k], alone.tensors[k], rtol=0, atol=0)
    assert after_shared.meta["train_loss"] == alone.meta["train_loss"]


def test_graphs_need_cuda(setup):
    _, model, tok, _ = setup
    with pytest.raises(ValueError, match="train.cuda_graphs"):
        StepRunner(model, lambda params, capturable: torch.optim.AdamW(params), max_grad_norm=1.0, prox_mu=0.0,
                   device=torch.device("cpu"), pad_id=tok.pad_token_id, graphs=True)


def _runner(model, tok, **kw):
    s = TrainSettings(local_steps=3, local_epochs=None, batch_size=4, lr=0.5, optimizer="sgd",
                              max_grad_norm=0.05, prox_mu=0.3, count_flops=False)
    return StepRunner(model, lambda params, capturable: make_optimizer(params, s, capturable),
                      max_grad_norm=s.max_grad_norm, prox_mu=s.prox_mu, device=torch.device("cpu"),
                      pad_id=tok.pad_token_id, **kw)


def test_static_runner_without_graphs_steps_like_the_masked_eager_runner(setup):
    """The captured step's math (right padding, no mask, head on every position, clipping, FedProx, the
    optimizer) run eagerly on the CPU ends where the masked eager step ends (SGD, clipping that bites)."""
    _, model, tok, data = setup
    init = adapter_state(model)
    chunks = [data.train[i: i + 4] for i in (0, 4, 8)]
    ends = []
    for static in (False, True):
        load_adapter_state(model, init)
        runner = _runner(model, tok, static=static, count_flops=True)
        runner.reset()
        for chunk in chunks:
            runner.step(chunk)
        ends.append((adapter_state(model), runner.losses(), runner.flops))
    (eager, eager_losses, _), (static, static_losses, flops) = ends
    assert static_losses == pytest.approx(eager_losses, rel=1e-5)
    for k in init:
        torch.testing.assert_close(static[k], eager[k], atol=1e-6, rtol=0)
    assert max(float((static[k] - init[k]).abs().max()) for k in init) > 1e-3  # it trained
    # FLOPs of the static path: each shape counted once and multiplied by its steps.
    shapes = [tuple(pad_to_bucket(collate(c, tok.pad_token_id), 64, tok.pad_token_id)["input_ids"].shape)
              for c in chunks]
    assert len(set(shapes)) == 1
    one = _runner(model, tok, static=True, count_flops=True)
    one.reset()
    one.step(chunks[0])
    assert one.flops > 0 and flops == 3 * one.flops


def test_pluggable_params_loss_and_clip_are_used(setup):
    """A runner over other tensors, with a loss that records a vector and a custom clip, steps those tensors."""
    _, model, tok, data = setup
    extra = torch.nn.Parameter(torch.ones(3))
    clipped = []

    def loss(m, ids, labels):
        base = static_loss(m, ids, labels).detach()
        per = base * extra  # a vector loss: recorded as is, its sum minimised
        return per.sum(), per

    def clip(params, max_norm):
        clipped.append((tuple(p.shape for p in params), max_norm))

    runner = _runner(model, tok, static=True, params=[extra], loss=loss, clip=clip)
    runner.reset()
    before = adapter_state(model)
    batch = pad_to_bucket(collate(data.train[:2], tok.pad_token_id), 64, tok.pad_token_id)
    runner.step_static(batch)
    (recorded,) = runner.losses()
    with torch.no_grad():
        expected = float(static_loss(model, batch["input_ids"], batch["labels"]))
    assert recorded == pytest.approx([expected] * 3, rel=1e-6)
    assert clipped == [(((3,),), 0.05)]
    # SGD on sum(base * extra) with FedProx at the start (no pull yet): extra -= lr * base.
    torch.testing.assert_close(extra.detach(), torch.full((3,), 1 - 0.5 * expected), atol=1e-5, rtol=0)
    assert all(torch.equal(v, adapter_state(model)[k]) for k, v in before.items())  # adapter untouched


def test_runner_refuses_conflicting_options(setup):
    _, model, tok, _ = setup
    with pytest.raises(ValueError, match="static=True"):
        _runner(model, tok, static=False, loss=lambda m, i, l: static_loss(m, i, l))
