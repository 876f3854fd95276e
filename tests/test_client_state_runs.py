"""SCAFFOLD and compressed runs end to end on the tiny model: the payload and its bytes, and a run killed
after a round resumes to the uninterrupted result (client state by round, server views and control variate)."""

from __future__ import annotations

import pytest
import torch

from fedtune import config as cfg
from fedtune import experiment
from fedtune.wire import Message, encode

from test_checkpoint import SMALL, adapter, crash_after_round_2, records

SCAFFOLD = [*SMALL, "federation.strategy=scaffold", "train.optimizer=sgd", "train.lr=0.5"]
BOTH = [*SCAFFOLD, "compression.kind=topk", "compression.ratio=0.05", "compression.direction=both"]


@pytest.mark.slow
def test_scaffold_with_compression_resumes_to_the_uninterrupted_result(tiny, tmp_path, monkeypatch):
    c = cfg.load(None, BOTH)
    whole = experiment.run(c, tmp_path / "whole", quiet=True)
    crash_after_round_2(c, tmp_path / "cut", monkeypatch)
    resumed = experiment.run(c, tmp_path / "cut", quiet=True)
    ref, got = adapter(tmp_path / "whole"), adapter(tmp_path / "cut")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0)
    assert any(float(ref[k].abs().max()) > 0 for k in ref if "lora_B" in k)
    for k in ("accuracy_by_round", "bytes_down", "client_rounds"):
        assert resumed[k] == whole[k], k
    assert (tmp_path / "cut" / "fedpeft-clients").is_dir()


@pytest.mark.slow
def test_scaffold_doubles_the_payload_and_compression_shrinks_it(tiny, tmp_path):
    plain = experiment.run(cfg.load(None, SMALL), tmp_path / "plain", quiet=True)
    doubled = experiment.run(cfg.load(None, SCAFFOLD), tmp_path / "scaffold", quiet=True)
    squeezed = experiment.run(cfg.load(None, BOTH), tmp_path / "both", quiet=True)
    # Down: the adapter and c (same shapes, float32): twice the tensor bytes, and the header of twice the
    # tensors (each control tensor's name longer by its "scaffold/" prefix).
    state = adapter(tmp_path / "plain")
    tensors = sum(t.numel() * 4 for t in state.values())
    per_message = lambda s: s["bytes_down"] / s["client_rounds"]
    assert 2 * tensors < per_message(doubled) <= 2 * per_message(plain) + (len("scaffold/") + 8) * len(state)
    assert per_message(doubled) - per_message(plain) > tensors
    # Compressed both ways at 5%: each message is an int32 index and a float32 value per kept entry.
    n = 2 * sum(t.numel() for t in adapter(tmp_path / "plain").values())
    assert per_message(squeezed) == len(encode(Message(
        {"idx": torch.zeros(-(-n * 5 // 100), dtype=torch.int32), "val": torch.zeros(-(-n * 5 // 100))},
        {"kind": "fit_ins", "round": 1, "dst": 0})))
    assert all(r["status"] == "ok" for r in records(tmp_path / "both") if r["type"] == "client")
