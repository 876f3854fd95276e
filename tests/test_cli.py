"""End to end: the real `fedtune` CLI on tiny-llama writes every output, and the adapter reloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import EXAMPLES, REPO
from fedtune import config as cfg
from fedtune.cli import main


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "quick"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "run", str(EXAMPLES / "quickstart-tiny.yaml"), "--out", str(out),
         "--quiet"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_run_writes_every_output(quickstart):
    out = quickstart
    for f in ["config.resolved.yaml", "metrics.jsonl", "summary.json", "report.md", "plots/accuracy.png",
              "plots/communication.png", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]:
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    for key in ["paradigm", "rounds", "num_clients", "base_accuracy", "accuracy", "bytes_up", "bytes_down",
                "client_flops", "client_peak_memory_bytes", "wall_time_s"]:
        assert s[key] is not None, key
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in records if r["type"] == "client"]
    assert len(clients) == 3 * 2
    # totals in the summary are the sums of the per-client-round records
    assert s["bytes_up"] == sum(r["bytes_up"] for r in clients)
    assert s["bytes_down"] == sum(r["bytes_down"] for r in clients)
    assert s["client_flops"] == sum(r["flops"] for r in clients) > 0
    for r in clients:
        assert {"bytes_up", "bytes_down", "flops", "peak_memory_bytes", "seconds", "train_loss",
                "num_examples"} <= set(r)
    # the resolved config is a loadable config equal to the example
    resolved = cfg.from_dict(yaml.safe_load((out / "config.resolved.yaml").read_text()))
    assert resolved == cfg.load(EXAMPLES / "quickstart-tiny.yaml")


def test_training_loss_goes_down(quickstart):
    records = [json.loads(line) for line in (quickstart / "metrics.jsonl").read_text().splitlines()]
    loss = {rnd: [r["train_loss"] for r in records if r["type"] == "client" and r["round"] == rnd] for rnd in (1, 2)}
    assert sum(loss[2]) / len(loss[2]) < sum(loss[1]) / len(loss[1])


def test_saved_adapter_reloads_with_peft_and_reproduces_logits_and_accuracy(quickstart, tiny):
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    from fedtune.evaluate import evaluate
    from fedtune.experiment import prepare_data
    from fedtune.models import attach_lora
    from fedtune.progress import Bars

    base, tok = tiny
    c = cfg.load(EXAMPLES / "quickstart-tiny.yaml")
    data = prepare_data(c, tok, Bars(quiet=True))
    loaded = PeftModel.from_pretrained(base, quickstart / "adapter")
    try:
        acc = evaluate(loaded, data.task, data.test[: c.eval.max_examples], batch_size=8,
                       device=torch.device("cpu"), pad_id=tok.pad_token_id)
        assert acc == pytest.approx(json.loads((quickstart / "summary.json").read_text())["accuracy"])
        ids = torch.tensor([data.test[0].prompt_ids])
        reloaded_logits = loaded(input_ids=ids).logits
        # the adapter is not a no-op: it changes the base model's logits
        with loaded.disable_adapter():
            assert not torch.allclose(loaded(input_ids=ids).logits, reloaded_logits)
    finally:
        loaded.unload()
    # same logits as our own model with the adapter state loaded by hand
    ours = attach_lora(base, c.peft, c.seed)
    try:
        state = load_file(quickstart / "adapter" / "adapter_model.safetensors")
        set_peft_model_state_dict(ours, state)
        torch.testing.assert_close(ours(input_ids=ids).logits, reloaded_logits)
    finally:
        ours.unload()


def test_user_mistakes_get_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation:\n  num_clients: 2\n  clients_per_round: 4\n")
    assert main(["run", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtune: error:") and "clients_per_round" in err and "Traceback" not in err


def test_bad_data_files_fail_fast(tmp_path, capsys):
    rows = tmp_path / "rows.csv"
    rows.write_text("sentence,label\ngood film,1\nbad film,0\nodd film,7\n" + "fine,1\n" * 20)
    base = ["--quiet", "--set", "model.name=tiny-llama", "--set", f"data.source={rows}", "--set",
            "data.label_words={0: negative, 1: positive}", "--set", "data.text_field=sentence",
            "--set", "federation.num_clients=2", "--set", "federation.clients_per_round=2"]
    assert main(["run", *base, "--set", "data.test_fraction=0.2", "--set", "data.prompt={sentence}"]) == 2
    err = capsys.readouterr().err
    assert "label '7' is not one of" in err and str(rows) in err
    assert main(["run", *base, "--set", "data.prompt={review}"]) == 2
    assert "review" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["run", "--quiet", "--set", f"data.source={empty}", "--set", "data.label_words=[a, b]"]) == 2
    assert "empty" in capsys.readouterr().err.lower()


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for key in ["federation:", "clients_per_round", "peft:", "target_modules", "--set", "--out", "--quiet"]:
        assert key in out
