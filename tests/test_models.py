from __future__ import annotations

import pytest
import torch

from fedtune import config as cfg
from fedtune.models import attach_lora
from fedtune.models import SMOLLM2, load_base, smollm2_dir, smollm2_gguf_path


def test_local_directory_loads_with_from_pretrained(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, tok2 = load_base(str(tmp_path / "m"))
    assert loaded is not model
    assert not any(p.requires_grad for p in loaded.parameters())
    ids = torch.tensor([tok("hello federated world")["input_ids"]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tok2("hello")["input_ids"] == tok("hello")["input_ids"]


def test_base_is_loaded_once_per_process(tiny):
    assert load_base("tiny-llama")[0] is tiny[0]


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a known name"):
        load_base("no-such-model")


def test_lora_target_module_typo_suggests_the_right_name(tiny):
    model, _ = tiny
    p = cfg.PeftConfig(target_modules=["q_proj", "v_prj"])
    with pytest.raises(ValueError) as e:
        attach_lora(model, p, 0)
    assert "'v_prj': did you mean 'v_proj'" in str(e.value) and "gate_proj" in str(e.value)


def test_smollm2_cache_matches_the_gguf_weights():
    """The cached safetensors copy is the GGUF model: same config, same logits."""
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    cached, tok = load_base(SMOLLM2)
    assert (smollm2_dir() / "model.safetensors").is_file()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert cached.config.num_hidden_layers == 30 and cached.config.hidden_size == 576
    assert cached.config.num_key_value_heads == 3 and cached.config.tie_word_embeddings
    assert sum(p.numel() for p in cached.parameters()) == 134_515_008
    ids = torch.tensor([tok("Federated learning keeps data where it is.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(cached(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_loading_a_model_prints_no_transformers_progress_bar(tiny, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    model, tok = tiny
    model.save_pretrained(tmp_path / "saved")  # transformers' own "Writing model shards" bar: setup, not ours
    tok.save_pretrained(tmp_path / "saved")
    capfd.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    loaded, _ = load_base(str(tmp_path / "saved"))
    out, err = capfd.readouterr()
    assert loaded is not model
    assert "Loading weights" not in err + out and "it/s" not in err + out and "%|" not in err + out, err[-500:]
    assert hf_logging.is_progress_bar_enabled()  # restored for the caller's own use of transformers
