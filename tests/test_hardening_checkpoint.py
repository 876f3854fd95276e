"""Checkpoints that were damaged, edited or replaced are caught with one clear message, and the previous one is kept."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune import checkpoint
from fedtune import config as cfg
from fedtune import experiment
from fedtune.wire import Message, decode, encode

SMALL = ["name=ckpt", "model.name=tiny-llama", "data.demo_train_size=40", "data.demo_test_size=8",
         "federation.num_clients=2", "federation.clients_per_round=2", "federation.rounds=2",
         "train.local_steps=1", "train.batch_size=4", "train.count_flops=false", "eval.max_examples=8"]


def _save_two(tmp_path):
    c = cfg.load(None, SMALL)
    ck = checkpoint.Checkpoint(tmp_path, c)
    meta = {"sampler": [3, [1, 2], None], "evaluations": []}
    ck.save(1, {"global": {"a": torch.ones(4)}}, meta)
    ck.save(2, {"global": {"a": torch.full((4,), 2.0)}}, meta)
    return c, ck


def _rewrite(path, edit_meta=None, edit_bytes=None):
    msg = decode(path.read_bytes())
    if edit_meta:
        edit_meta(msg.meta)
    data = bytearray(encode(msg))
    if edit_bytes:
        edit_bytes(data)
    path.write_bytes(bytes(data))


def test_the_previous_checkpoint_is_kept_and_an_unreadable_one_falls_back_to_it(tmp_path):
    c, ck = _save_two(tmp_path)
    assert ck.load().round == 2 and (tmp_path / checkpoint.PREVIOUS).is_file()

    def flip_last_byte(data):
        data[-1] ^= 0xFF

    _rewrite(ck.path, edit_bytes=flip_last_byte)  # a flipped byte of tensor data
    saved = ck.load()
    assert saved.round == 1 and torch.equal(saved.tensors["global"]["a"], torch.ones(4))
    assert "SHA-256" in ck.fallback and checkpoint.PREVIOUS in ck.fallback


@pytest.mark.parametrize("edit", [
    lambda m: m.update(round=m["round"] + 1),  # an edited round number would skip a round
    lambda m: m.update(rnd=m.pop("round")),  # a renamed header key was a bare KeyError
    lambda m: m.pop("sha256"),  # no checksum at all
    lambda m: m.update(round="2"),
])
def test_an_edited_checkpoint_is_refused_with_the_unreadable_message(tmp_path, edit):
    c, ck = _save_two(tmp_path)
    (tmp_path / checkpoint.PREVIOUS).unlink()
    _rewrite(ck.path, edit_meta=edit)
    with pytest.raises(ValueError, match=r"is not a readable fedtune checkpoint .*delete checkpoint.safetensors"):
        ck.load()


def test_a_directory_in_place_of_the_checkpoint_is_a_clear_error(tmp_path):
    c = cfg.load(None, SMALL)
    (tmp_path / checkpoint.FILE).mkdir()
    ck = checkpoint.Checkpoint(tmp_path, c)
    with pytest.raises(ValueError, match="is a directory"):
        ck.load()
    with pytest.raises(ValueError, match="is a directory"):
        ck.save(1, {}, {"sampler": [], "evaluations": []})


def test_a_failed_resume_adds_no_round_zero_record_and_a_corrupt_checkpoint_resumes_from_the_previous(tiny, tmp_path):
    c = cfg.load(None, SMALL)
    whole = experiment.run(c, tmp_path / "r", quiet=True)
    records = lambda: [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    before = records()
    path, previous = tmp_path / "r" / checkpoint.FILE, tmp_path / "r" / checkpoint.PREVIOUS
    previous_bytes = previous.read_bytes()
    previous.unlink()
    path.write_bytes(b"\0" * 64)
    for _ in range(2):
        with pytest.raises(ValueError, match="not a readable fedtune checkpoint"):
            experiment.run(c, tmp_path / "r", quiet=True)
    assert records() == before  # no round-0 record per failed attempt
    previous.write_bytes(previous_bytes)  # the checkpoint after round 1: round 2 is redone
    again = experiment.run(c, tmp_path / "r", quiet=True)
    assert again["accuracy_by_round"] == whole["accuracy_by_round"]
    keys = [(r["type"], r.get("round"), r.get("client"), r.get("model")) for r in records()]
    assert len(keys) == len(set(keys))
