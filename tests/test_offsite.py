"""Offsite-tuning: the emulator's blocks, adapter names that plug into the full model, zero adapters equal the
base, the emulator message, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from fedtune import config as cfg
from fedtune import experiment
from fedtune.models import attach_lora, tiny_llama_config
from fedtune.paradigms import offsite as off
from fedtune.train.adapter import adapter_state, load_adapter_state
from fedtune.wire import Message, decode, encode, encoded_size

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
PEFT = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def six(tiny):
    """A 6-block tiny Llama with LoRA on every block (the run's full model)."""
    config = tiny_llama_config(len(tiny[1]))
    config.num_hidden_layers = 6
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return attach_lora(base, cfg.PeftConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), 0)


def test_layer_plan_keeps_the_adapter_blocks_and_drops_the_middle_uniformly():
    assert off.layer_plan(6, 1, 1, 2) == [0, 1, 3, 5]
    assert off.layer_plan(30, 2, 2, None) == [0, 1, 2, 6, 10, 15, 19, 23, 28, 29]  # 6 of the 26 middle blocks kept
    assert off.layer_plan(2, 1, 1, None) == [0, 1]
    assert off.adapter_layers([0, 1, 3, 5], 1, 1) == [0, 3]
    with pytest.raises(ValueError, match="offsite.middle"):
        off.layer_plan(6, 1, 1, 5)
    with pytest.raises(ValueError, match="offsite.bottom"):
        off.layer_plan(2, 2, 1, None)


def test_the_emulator_has_the_expected_blocks(six):
    plan = off.layer_plan(6, 1, 1, 2)
    config, weights = off.build_emulator(six, plan)
    assert config.num_hidden_layers == 4
    full = off.base_weights(six)
    for j, i in enumerate(plan):
        torch.testing.assert_close(weights[f"model.layers.{j}.mlp.up_proj.weight"],
                                   full[f"model.layers.{i}.mlp.up_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(weights[f"model.layers.{j}.self_attn.q_proj.weight"],
                                   full[f"model.layers.{i}.self_attn.q_proj.weight"], rtol=0, atol=0)
    assert not any(k.startswith("model.layers.4.") for k in weights) and not any("lora_" in k for k in weights)
    emulator = off.emulator_model(config.to_json_string(use_diff=False), weights, PEFT, [0, 3], CPU)
    assert emulator.get_base_model().config.num_hidden_layers == 4
    lora_blocks = {int(k.split(".layers.")[1].split(".")[0]) for k in adapter_state(emulator)}
    assert lora_blocks == {0, 3}  # adapters on the bottom and top blocks only; the middle is frozen


def test_emulator_adapters_plug_into_the_full_model_by_name(six):
    plan = off.layer_plan(6, 1, 1, 2)
    config, weights = off.build_emulator(six, plan)
    emulator = off.emulator_model(config.to_json_string(use_diff=False), weights, PEFT, [0, 3], CPU)
    full0 = adapter_state(six)
    start = off.to_emulator(full0, plan, [0, 3])
    assert set(start) == set(adapter_state(emulator))  # the full model's adapter blocks, under emulator names
    trained = {k: torch.randn_like(v) for k, v in start.items()}
    load_adapter_state(emulator, trained)
    plugged = off.to_full(adapter_state(emulator), plan)
    assert set(plugged) <= set(full0) and {k.split(".layers.")[1].split(".")[0] for k in plugged} == {"0", "5"}
    load_adapter_state(six, {**full0, **plugged})
    for k, v in plugged.items():
        torch.testing.assert_close(adapter_state(six)[k], v, rtol=0, atol=0)
    load_adapter_state(six, full0)


def test_the_full_model_with_zero_adapters_equals_the_base(six):
    plan = off.layer_plan(6, 1, 1, 2)
    full0 = adapter_state(six)
    zero = {k: torch.zeros_like(v) for k, v in off.to_emulator(full0, plan, [0, 3]).items()}
    load_adapter_state(six, {**full0, **off.to_full(zero, plan)})
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plugged = six(input_ids=ids).logits
        with six.disable_adapter():
            base = six(input_ids=ids).logits
    torch.testing.assert_close(plugged, base, rtol=0, atol=0)
    load_adapter_state(six, full0)


def test_the_emulator_travels_as_a_message_and_is_rebuilt_equal(six):
    plan = off.layer_plan(6, 1, 1, 2)
    config, weights = off.build_emulator(six, plan)
    tensors, meta = off.emulator_message_parts(config, weights, plan, [0, 3], PEFT)
    msg = Message(tensors, {"kind": "offsite_ins", "emulator": meta})
    payload = encode(msg)
    assert encoded_size(msg) == len(payload)
    got = decode(payload)
    rebuilt = off.emulator_model(got.meta["emulator"]["config"],
                                 {k[len(off.PREFIX):]: v for k, v in got.tensors.items()}, PEFT, [0, 3], CPU)
    direct = off.emulator_model(config.to_json_string(use_diff=False), weights, PEFT, [0, 3], CPU)
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, direct(input_ids=ids).logits, rtol=0, atol=0)


SMALL = ["model.name=tiny-llama", "data.demo_train_size=60", "data.demo_test_size=12", "federation.num_clients=2",
         "federation.clients_per_round=1", "federation.rounds=3", "federation.paradigm=offsite",
         "train.local_steps=2", "train.batch_size=4", "data.max_length=48", "eval.max_examples=12",
         "offsite.bottom=1", "offsite.top=1"]


def test_end_to_end_run_counts_the_emulator_once_per_client(tmp_path):
    summary = experiment.run(cfg.load(None, SMALL), tmp_path, quiet=True)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["access"] == "gray" and saved["backprop"] is True
    assert "emulator_accuracy" in saved["paradigm_metrics"]
    clients = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in clients if r["type"] == "client"]
    firsts = {}
    for r in clients:
        assert r["status"] == "ok"
        assert ("emulator_bytes" in r) == (r["client"] not in firsts)
        firsts.setdefault(r["client"], r["round"])
    assert summary["bytes_down"] == sum(r["bytes_down"] for r in clients)
