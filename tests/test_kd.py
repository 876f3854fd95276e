"""KD-FedLLM on tiny-llama: bytes on the wire, the round loop, bad replies, client models, end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

import fedtune
from conftest import EXAMPLES
from fedtune import config as cfg
from fedtune.context import RunContext
from fedtune.data.tasks import GenerationTask
from fedtune.evaluate import evaluate
from fedtune.experiment import prepare_data
from fedtune.models import attach_lora
from fedtune.paradigms import fedpeft, kd
from fedtune.progress import Bars
from fedtune.runtime.local import LocalGrid
from fedtune.wire import Message, WireError, encode, encoded_size
from fedtune.train.adapter import adapter_state
from fedtune.train.local_steps import TrainSettings

CPU = torch.device("cpu")
KD = ["federation.paradigm=kd", "kd.public_fraction=0.3", "kd.public_size=16", "kd.server_steps=2",
      "kd.distill_steps=2", "data.demo_train_size=60", "data.demo_test_size=12", "train.local_steps=2",
      "train.batch_size=4", "eval.base=false"]


# On a small shared machine, torch's intra-op threads fighting other work make these tiny
# models 10-50x slower; one thread keeps the file well under a minute.
pytestmark = pytest.mark.usefixtures("one_thread")


def header_bytes(payload: bytes) -> int:
    """The safetensors JSON header length (the 8-byte prefix), i.e. everything that is not tensor data."""
    return int.from_bytes(payload[:8], "little")


def settings(**kw) -> TrainSettings:
    return TrainSettings(local_steps=1, local_epochs=None, batch_size=4, lr=0.01, count_flops=False, **kw)


def reply_of(model, tok, private, public: kd.PublicSet) -> Message:
    client = kd.KDClient(0, model, private, public, settings(), adapter_state(model), distill_steps=1,
                         device=CPU, pad_id=tok.pad_token_id, seed=0)
    return client(Message({}, {"kind": "kd_ins", "round": 1, "dst": 0}))


# --------------------------------------------------------------------------- bytes


def test_classification_reply_is_public_size_times_labels_times_two_bytes(tiny):
    base, tok = tiny
    c = cfg.load(EXAMPLES / "quickstart-tiny.yaml", KD)
    data = prepare_data(c, tok, Bars(quiet=True))
    model = attach_lora(base, c.peft, c.seed)
    try:
        private = [data.train[j] for j in data.parts[0]]
        labels = len(data.task.label_words)
        for size in (16, 8):
            public = kd.make_public_set(data.public[:size], data.task, vocab=len(tok), pad_id=tok.pad_token_id,
                                        top_k=8, full_logits=False, temperature=1.0, batch_size=4)
            reply = reply_of(model, tok, private, public)
            payload = encode(reply)
            assert reply.tensors["logits"].shape == (size, labels)
            assert len(payload) == encoded_size(reply) == 8 + header_bytes(payload) + size * labels * 2
            assert header_bytes(payload) < 1000  # the rest is metadata
    finally:
        model.unload()


def generation_setup(tok, n_public: int):
    task = GenerationTask(tok, "{text}", "rouge_l", 4, system_prompt="You are a helpful assistant.",
                          use_chat_template=True, max_length=64)
    texts = ["Name a colour of the sky.", "What do bees make?", "Say hello in French.", "Two plus two is?"]
    private = [task.encode({"text": t, "response": "blue"}, "response") for t in texts]
    public = [task.encode_prompt({"text": texts[i % len(texts)]}) for i in range(n_public)]
    return task, private, public


def test_generation_reply_grows_linearly_with_top_k_and_public_size(tiny):
    base, tok = tiny
    c = cfg.load(None, ["model.name=tiny-llama"])
    model = attach_lora(base, c.peft, c.seed)
    try:
        sizes = {}
        for n_public in (4, 8):
            task, private, prompts = generation_setup(tok, n_public)
            # Positions that travel: each prompt after the prefix all prompts share (an independent count).
            common = len(os.path.commonprefix([e.prompt_ids for e in prompts]))
            rows = sum(len(e.prompt_ids) - common for e in prompts)
            assert 0 < rows < sum(len(e.prompt_ids) for e in prompts)
            for k, full in [(2, False), (4, False), (8, False), (8, True)]:
                public = kd.make_public_set(prompts, task, vocab=len(tok), pad_id=tok.pad_token_id, top_k=k,
                                            full_logits=full, temperature=1.0, batch_size=4)
                reply = reply_of(model, tok, private, public)
                payload = encode(reply)
                assert len(payload) == encoded_size(reply)
                data = len(payload) - 8 - header_bytes(payload)
                # int32 id + float16 value per kept logit; float16 per vocabulary entry when not compressed
                assert data == (rows * len(tok) * 2 if full else rows * k * (4 + 2))
                sizes[n_public, k, full] = len(payload)
        # The data part is exactly linear (asserted above); whole payloads differ by a header of a few hundred
        # bytes whose length moves a little with the metadata (timings, memory).
        for n in (4, 8):  # linear in k: doubling k adds twice as many bytes as the step before
            step1, step2 = sizes[n, 4, False] - sizes[n, 2, False], sizes[n, 8, False] - sizes[n, 4, False]
            assert step1 > 0 and abs(step2 - 2 * step1) <= 100
        for k in (2, 4, 8):  # linear in the public set: twice the prompts, twice the bytes (but one header)
            assert abs(sizes[8, k, False] - 2 * sizes[4, k, False]) <= 1000
        # Not compressing costs vocab / k times more per position, divided by 3 since an id takes 4 bytes
        # (the top-k payload also carries a header of a few hundred bytes, hence "roughly").
        ratio = sizes[8, 8, True] / sizes[8, 8, False]
        assert 0.8 * len(tok) / (3 * 8) < ratio < len(tok) / (3 * 8)
    finally:
        model.unload()


def test_soft_labels_survive_the_wire_and_a_model_distilled_toward_its_own_are_at_rest(tiny):
    base, tok = tiny
    c = cfg.load(None, ["model.name=tiny-llama"])
    model = attach_lora(base, c.peft, c.seed)
    try:
        task, private, prompts = generation_setup(tok, 4)
        for full in (True, False):
            public = kd.make_public_set(prompts, task, vocab=len(tok), pad_id=tok.pad_token_id, top_k=4,
                                        full_logits=full, temperature=2.0, batch_size=4)
            tensors = public.reply_tensors(model, CPU)
            labels = public.from_wire(public.to_wire(public.soft_labels([(tensors, 3.0), (tensors, 1.0)], CPU)), CPU)
            loss = public.loss(model, [0, 1, 2, 3], labels, CPU).item()
            if full:  # the teacher is the model itself, up to float16 rounding
                assert loss == pytest.approx(0.0, abs=1e-3)
            else:  # the student still puts mass outside the teacher's top-4
                assert loss > 0.01
            with pytest.raises(WireError, match="soft labels"):
                public.from_wire({"probs": torch.ones(public.rows + 1, 4).half()}, CPU)
    finally:
        model.unload()


# --------------------------------------------------------------------------- the round loop


def nan_client(public: kd.PublicSet):
    def app(msg: Message) -> Message:
        ids = torch.zeros(public.rows, public.top_k, dtype=torch.int32)
        values = torch.full((public.rows, public.top_k), float("nan"), dtype=torch.float16)
        return Message({"ids": ids, "values": values}, {"num_examples": 1000})
    return app


def out_of_vocab_client(public: kd.PublicSet):
    def app(msg: Message) -> Message:
        ids = torch.full((public.rows, public.top_k), public.vocab, dtype=torch.int32)
        return Message({"ids": ids, "values": torch.zeros(public.rows, public.top_k).half()}, {"num_examples": 1000})
    return app


def test_generation_rounds_skip_bad_replies_and_leave_the_global_adapter_loaded(tiny, tmp_path):
    base, tok = tiny
    rows = [{"text": f"Question {i}: what is {i} plus {i}?", "response": f"{2 * i}"} for i in range(24)]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = cfg.load(None, ["model.name=tiny-llama", f"data.source={tmp_path / 'gen.jsonl'}", "data.task=generation",
                        "data.max_new_tokens=3", "data.max_length=64", "federation.paradigm=kd",
                        "federation.num_clients=4", "federation.clients_per_round=4", "federation.rounds=2",
                        "kd.public_fraction=0.25", "kd.top_k=4", "kd.server_steps=2", "kd.distill_steps=1",
                        "kd.temperature=2.0", "train.local_steps=1", "train.batch_size=4", "train.lr=0.01",
                        "train.count_flops=false"])
    data = prepare_data(c, tok, Bars(quiet=True))
    model = attach_lora(base, c.peft, c.seed)
    log: list[dict] = []

    def score() -> float:
        return evaluate(model, data.task, data.test, batch_size=4, device=CPU, pad_id=tok.pad_token_id)

    ctx = RunContext(config=c, model=model, tokenizer=tok, data=data, device=CPU, bars=Bars(quiet=True),
                     log=log.append, score=score, path=tmp_path / "run")
    try:
        init = adapter_state(model)
        apps = kd.make_clients(ctx)
        public = apps[0].public
        assert public.mode == "topk" and len(public.examples) == len(data.public) == 5
        apps[2], apps[3] = nan_client(public), out_of_vocab_client(public)
        evaluations = kd.run_server(ctx, LocalGrid(apps))

        assert [e["round"] for e in evaluations] == [1, 2]
        clients = [r for r in log if r["type"] == "client"]
        assert {(r["round"], r["client"]): r["status"] for r in clients} == {
            (r, n): s for r in (1, 2) for n, s in [(0, "ok"), (1, "ok"), (2, "rejected"), (3, "rejected")]}
        errors = {r["client"]: r["error"] for r in clients if r["status"] != "ok"}
        assert "NaN/Inf" in errors[2] and "[0, 49152)" in errors[3]
        assert [r["replies"] for r in log if r["type"] == "round"] == [2, 2]
        assert [r["steps"] for r in log if r["type"] == "server"] == [2, 2]
        ok = {(r["round"], r["client"]): r for r in clients if r["status"] == "ok"}
        assert ok[1, 0]["distill_loss"] is None and ok[2, 0]["distill_loss"] > 0  # soft labels arrive in round 2
        # Round 1 sends nothing but a header; round 2 the union of two top-4s per position, as ids + probs.
        down = {r: {x["bytes_down"] for x in clients if x["round"] == r} for r in (1, 2)}
        assert len(down[1]) == len(down[2]) == 1 and down[1].pop() < 200
        assert public.rows * 4 * 6 <= down[2].pop() <= public.rows * 8 * 6 + 1000
        # The final global adapter is loaded in ctx.model, equals the one saved, and was trained.
        saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
        now = get_peft_model_state_dict(model)
        assert set(saved) == set(now) and all(torch.equal(saved[k], now[k]) for k in now)
        assert any(not torch.equal(now[k], init[k]) for k in now)
        # Clients kept their own adapters (on the CPU) from round to round.
        assert all(v.device.type == "cpu" for v in apps[0].state.values())
        assert any(not torch.equal(apps[0].state[k], apps[1].state[k]) for k in init)
    finally:
        model.unload()


def test_an_empty_public_set_and_a_top_k_over_the_vocabulary_fail_fast(tiny):
    _, tok = tiny
    task, _, prompts = generation_setup(tok, 2)
    common = dict(pad_id=tok.pad_token_id, full_logits=False, temperature=1.0, batch_size=4)
    with pytest.raises(ValueError, match="public set is empty"):
        kd.make_public_set([], task, vocab=len(tok), top_k=8, **common)
    with pytest.raises(ValueError, match=r"kd.top_k = 49153 is larger than the vocabulary \(49152 tokens\)"):
        kd.make_public_set(prompts, task, vocab=len(tok), top_k=49153, **common)


# --------------------------------------------------------------------------- end to end


def test_kd_run_end_to_end(tiny, tmp_path):
    c = cfg.load(EXAMPLES / "quickstart-tiny.yaml", KD)
    s = fedtune.run(c, out=tmp_path / "run", quiet=True)
    out = tmp_path / "run"
    assert json.loads((out / "summary.json").read_text()) == s
    assert s["paradigm"] == "kd" and s["accuracy"] is not None
    assert s["bytes_up"] > 0 and s["client_flops"] > 0 and s["server_flops"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in records if r["type"] == "client"]
    assert len(clients) == 3 * 2 and all(r["status"] == "ok" for r in clients)
    for r in clients:
        assert {"round", "client", "bytes_down", "bytes_up", "status", "num_examples", "train_loss", "flops",
                "peak_memory_bytes", "seconds"} <= set(r)
        # 16 public prompts x 6 label words x 2 bytes, plus a header
        assert 16 * 6 * 2 < r["bytes_up"] < 16 * 6 * 2 + 1000
    assert s["bytes_up"] == sum(r["bytes_up"] for r in clients)
    servers = [r for r in records if r["type"] == "server"]
    assert [r["round"] for r in servers] == [1, 2] and all(r["flops"] > 0 and r["seconds"] > 0 for r in servers)
    assert all({"peak_memory_bytes", "steps"} <= set(r) for r in servers)
    assert s["server_flops"] == sum(r["flops"] for r in servers)
    assert [r["round"] for r in records if r["type"] == "eval"] == [1, 2]
    assert [r["round"] for r in records if r["type"] == "round"] == [1, 2]


def save_model_dir(path: Path, tokenizer, layers: int) -> Path:
    from transformers import LlamaForCausalLM

    from fedtune.models import tiny_llama_config

    config = tiny_llama_config(len(tokenizer))
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_client_model_with_another_tokenizer_fails_fast(tiny, tmp_path):
    from transformers import AutoTokenizer

    _, tok = tiny
    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    other.add_tokens(["<not-in-the-server-vocabulary>"])
    path = save_model_dir(tmp_path / "other", other, layers=1)
    c = cfg.load(EXAMPLES / "quickstart-tiny.yaml", KD + [f"kd.client_model={path}"])
    with pytest.raises(ValueError, match=r"kd.client_model = .*different tokenizer.*49153 vs 49152 tokens"):
        fedtune.run(c, out=tmp_path / "run", quiet=True)


def test_a_smaller_client_model_with_the_same_tokenizer_runs_and_is_unloaded(tiny, tmp_path):
    from fedtune.models import load_base

    _, tok = tiny
    path = save_model_dir(tmp_path / "small", tok, layers=1)
    c = cfg.load(EXAMPLES / "quickstart-tiny.yaml",
                 KD + [f"kd.client_model={path}", "federation.rounds=1", "data.demo_test_size=6"])
    s = fedtune.run(c, out=tmp_path / "run", quiet=True)
    assert s["failed_client_rounds"] == 0 and s["client_flops"] > 0
    client_base, _ = load_base(str(path))
    assert not any("lora" in n for n, _ in client_base.named_modules())  # the client PeftModel was unloaded
