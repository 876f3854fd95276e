"""KD under label skew on tiny-llama: server keep-best, prior-corrected replies, label counts, hybrid, config checks."""

from __future__ import annotations

import json
import random

import pytest
import torch

import fedtune
from conftest import EXAMPLES
from fedtune import config as cfg
from fedtune import distill
from fedtune.data.tasks import collate
from fedtune.experiment import prepare_data
from fedtune.train.losses import label_scores
from fedtune.models import attach_lora
from fedtune.paradigms import fedpeft, kd
from fedtune.progress import Bars
from fedtune.wire import Message, WireError
from fedtune.train.adapter import adapter_state, load_adapter_state
from fedtune.train.local_steps import TrainSettings

CPU = torch.device("cpu")
KD = ["federation.paradigm=kd", "kd.public_fraction=0.3", "kd.public_size=16", "kd.server_steps=2",
      "kd.distill_steps=2", "data.demo_train_size=80", "data.demo_test_size=12", "train.local_steps=2",
      "train.batch_size=4", "eval.base=false"]

pytestmark = pytest.mark.usefixtures("one_thread")


def setup_public(tiny, extra=()):
    base, tok = tiny
    c = cfg.load(EXAMPLES / "quickstart-tiny.yaml", KD + ["kd.val_size=12", *extra])
    data = prepare_data(c, tok, Bars(quiet=True))
    model = attach_lora(base, c.peft, c.seed)
    public = kd.make_public_set(data.public, data.task, vocab=len(tok), pad_id=tok.pad_token_id, top_k=8,
                                full_logits=False, temperature=1.0, batch_size=4)
    return c, tok, data, model, public


def val_log_likelihood(model, val, pad_id, label_ids) -> float:
    """A fine-grained validation score: mean log-probability of the true label among the label words."""
    batch = collate(val, pad_id, with_target=False)
    with torch.no_grad():
        scores = label_scores(model, batch, label_ids)
    return float(torch.log_softmax(scores, -1).gather(-1, batch["label"][:, None]).mean())


@pytest.mark.parametrize("toward", ["wrong", "right"])
def test_keep_best_never_returns_a_model_scoring_below_its_start_on_the_validation_split(tiny, toward):
    c, tok, data, model, public = setup_public(tiny)
    try:
        val = data.extras['server_val']
        assert len(val) == 12
        # Soft labels that are one-hot on a wrong class (label 0 -> 1, ...) push the model away from the truth on
        # val; one-hot on val's own majority label pulls it there.
        majority = int(torch.tensor([e.label for e in val]).mode().values)
        wrong = (majority + 1) % public.width
        target = torch.zeros(public.rows, public.width)
        target[:, wrong if toward == "wrong" else majority] = 1.0
        labels = {"probs": target}
        start_state = adapter_state(model)
        score = lambda: val_log_likelihood(model, val, tok.pad_token_id, public.label_ids)  # noqa: E731
        start = score()
        params = [p for p in model.parameters() if p.requires_grad]

        def opt():
            return torch.optim.Adam(params, lr=0.02)

        # Without keep-best the same distillation ends below (wrong) or above (right) where it started ...
        kd.distil(model, opt(), public, labels, 6, random.Random(0), device=CPU, max_grad_norm=1.0)
        plain = score()
        assert plain < start if toward == "wrong" else plain > start
        # ... with keep-best it never ends below its start, and returns the adapter it reports as best.
        load_adapter_state(model, start_state)
        losses, kept = kd.distil_keep_best(model, opt(), public, labels, 6, random.Random(0), device=CPU,
                                           max_grad_norm=1.0, score=score, every=2)
        assert len(losses) == 6 and kept["val_start"] == pytest.approx(start)
        assert score() == pytest.approx(kept["val_best"]) and kept["val_best"] >= start
        assert kept["val_best"] == pytest.approx(max(kept["val_scores"]))
        if toward == "wrong":
            assert kept["best_step"] == 0  # the start was the best: the adapter is back where it began
            now = adapter_state(model)
            assert all(torch.equal(now[k], start_state[k]) for k in now)
        else:
            assert kept["best_step"] > 0 and kept["val_best"] > start
        # Early stopping: with patience 1 a harmful distillation stops after its first score.
        load_adapter_state(model, start_state)
        losses, kept = kd.distil_keep_best(model, opt(), public, labels, 6, random.Random(0), device=CPU,
                                           max_grad_norm=1.0, score=score, every=2, patience=1)
        if toward == "wrong":
            assert len(losses) == 2 and kept["val_best"] == pytest.approx(start)
    finally:
        model.unload()


def test_the_server_validation_split_is_held_back_from_clients_and_disjoint_from_public_and_test(tiny):
    c, tok, data, model, public = setup_public(tiny)
    model.unload()
    c0 = cfg.load(EXAMPLES / "quickstart-tiny.yaml", KD)
    plain = prepare_data(c0, tok, Bars(quiet=True))
    # The same public set, and 12 more training rows taken from the clients (labels kept, for the server only).
    assert [e.prompt_ids for e in data.public] == [e.prompt_ids for e in plain.public]
    assert sum(map(len, plain.parts)) - sum(map(len, data.parts)) == 12
    in_parts = {i for p in data.parts for i in p}
    val_ids = [e.prompt_ids for e in data.extras['server_val']]
    assert all(e.label is not None for e in data.extras['server_val'])
    assert not any(data.train[i].prompt_ids in val_ids for i in in_parts)
    assert not any(e.prompt_ids in val_ids for e in data.test)
    with pytest.raises(ValueError, match="kd.val_size = 1000 leaves no training rows"):
        prepare_data(cfg.load(EXAMPLES / "quickstart-tiny.yaml", KD + ["kd.val_size=1000"]), tok, Bars(quiet=True))


def test_a_client_sends_prior_corrected_logits_and_its_label_counts(tiny):
    c, tok, data, model, _ = setup_public(tiny)
    try:
        private = [data.train[j] for j in data.parts[0]]
        plain = kd.make_public_set(data.public, data.task, vocab=len(tok), pad_id=tok.pad_token_id, top_k=8,
                                   full_logits=False, temperature=2.0, batch_size=4)
        fixed = kd.make_public_set(data.public, data.task, vocab=len(tok), pad_id=tok.pad_token_id, top_k=8,
                                   full_logits=False, temperature=2.0, batch_size=4, vote_correction="prior",
                                   class_weighting=True)
        raw = plain.reply_tensors(model, CPU)["logits"]
        client = kd.KDClient(0, model, private, fixed, TrainSettings(1, None, 4, 0.0, count_flops=False),
                             adapter_state(model), distill_steps=0, device=CPU, pad_id=tok.pad_token_id,
                             seed=0)
        counts = torch.bincount(torch.tensor([e.label for e in private]), minlength=fixed.width).to(torch.int32)
        assert torch.equal(client.counts, counts)
        reply = client(Message({}, {"kind": "kd_ins", "round": 1, "dst": 0}))  # lr 0: the model is unchanged
        fixed.check_reply(reply)
        assert torch.equal(reply.tensors["label_counts"], counts)
        want = distill.prior_correct(distill.probs(raw, 2.0), distill.label_prior(counts))
        torch.testing.assert_close(distill.probs(reply.tensors["logits"], 2.0), want, atol=2e-3, rtol=1e-2)
        with pytest.raises(WireError):
            plain.check_reply(reply)  # an unexpected tensor
    finally:
        model.unload()


def test_hybrid_kd_runs_end_to_end_sends_adapters_and_reports_client_accuracy(tiny, tmp_path):
    c = cfg.load(EXAMPLES / "quickstart-tiny.yaml",
                 KD + ["kd.mode=hybrid", "kd.val_size=8", "kd.vote_correction=prior", "kd.class_weighting=true",
                       "kd.sharpen=2", "kd.server_steps=4", "kd.val_every=2"])
    s = fedtune.run(c, out=tmp_path / "run", quiet=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in records if r["type"] == "client"]
    assert all(r["status"] == "ok" for r in clients)
    # The adapter travels both ways (LoRA r=8 on 4 projections of 2 layers, float32): far more than the logits.
    assert min(r["bytes_up"] for r in clients) > 10_000 and min(r["bytes_down"] for r in clients) > 10_000
    last = [r for r in clients if r["round"] == 2]
    assert all("client_accuracy" in r for r in last) and not any("client_accuracy" in r for r in clients
                                                                   if r["round"] == 1)
    assert s["client_accuracy"] == pytest.approx(sum(r["client_accuracy"] for r in last) / len(last))
    servers = [r for r in records if r["type"] == "server"]
    assert all(r["val_best"] >= r["val_start"] for r in servers)


@pytest.mark.parametrize("override, message", [
    ("kd.sharpen=0", "kd.sharpen = 0.0 is not allowed"),
    ("kd.val_size=-1", "kd.val_size = -1 is not allowed"),
    ("kd.val_every=0", "kd.val_every = 0 is not allowed"),
    ("kd.patience=0", "kd.patience = 0 is not allowed"),
    ("kd.server_lr=0", "kd.server_lr = 0.0 is not allowed"),
    ("kd.mode=hybird", "Did you mean 'hybrid'"),
    ("kd.vote_correction=priors", "Did you mean 'prior'"),
    ("kd.mode=hybrid kd.client_model=other/model", "same shapes"),
])
def test_bad_kd_settings_fail_with_a_clear_error(override, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load(None, ["federation.paradigm=kd"] + override.split())


def test_label_corrections_need_a_classification_task():
    with pytest.raises(cfg.ConfigError, match="classification tasks only"):
        cfg.load(None, ["federation.paradigm=kd", "data.task=generation", "kd.class_weighting=true"])
