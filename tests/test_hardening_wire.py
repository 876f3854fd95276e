"""Hostile replies (issue 17's attack probe): oversized headers, forged counts and metrics are refused or dropped."""

from __future__ import annotations

import json
import time

import pytest
import torch

from fedtune.rounds import screen_reply
from fedtune.wire import Message, WireError, decode, encode, spec_of


def _payload(n_tensors: int) -> bytes:
    return encode(Message({f"t{i}": torch.zeros(0) for i in range(n_tensors)}, {"kind": "fit_res"}))


def test_a_header_of_many_empty_tensors_is_refused_before_parsing():
    good = {"a": torch.zeros(4), "b": torch.zeros(2, 2)}
    payload = _payload(30_000)
    start = time.perf_counter()
    with pytest.raises(WireError, match="tensors|header"):
        decode(payload, expect=spec_of(good))
    assert time.perf_counter() - start < 0.05  # one byte count, not a parse of 30,000 entries
    with pytest.raises(WireError, match="30000 tensors"):
        decode(payload, max_tensors=1000)
    decode(encode(Message(good, {"kind": "fit_res"})), expect=spec_of(good))  # the honest message passes


def test_a_header_length_past_the_payload_is_refused():
    payload = bytearray(encode(Message({"a": torch.zeros(4)}, {})))
    payload[:8] = (10**12).to_bytes(8, "little")
    with pytest.raises(WireError, match="header"):
        decode(bytes(payload))


def test_a_bool_tensor_holding_other_bytes_is_refused():
    payload = bytearray(encode(Message({"m": torch.tensor([True, False, True])}, {})))
    payload[-3] = 7  # the first value's byte
    with pytest.raises(WireError, match="other than 0 and 1"):
        decode(bytes(payload), expect={"m": ((3,), torch.bool)})


def _reply(**meta):
    return Message({"a": torch.ones(2)}, {"kind": "fit_res", **meta})


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "7", True, 0, -3, 2.5, None, 1e300])
def test_a_forged_num_examples_is_rejected_with_the_reason(value):
    # 1e999 in a peer's JSON decodes to inf: the same as the first case, through the wire.
    fields, update = screen_reply(decode(encode(_reply(num_examples=value))), lambda r: None)
    assert update is None and fields["status"] == "rejected"
    assert "num_examples" in fields["error"]


def test_num_examples_of_ten_to_the_400_is_rejected_not_a_crash():
    fields, update = screen_reply(decode(encode(_reply(num_examples=10**400))), lambda r: None)
    assert update is None and "num_examples" in fields["error"]
    fields, update = screen_reply(_reply(num_examples=7), lambda r: None)
    assert update is not None and update[1] == 7.0 and fields["num_examples"] == 7


def test_bad_client_metrics_are_dropped_with_the_reason_and_good_ones_kept():
    meta = {"num_examples": 5, "flops": "x", "seconds": "x", "peak_memory_bytes": None, "steps": 3,
            "train_loss": float("nan"), "train_loss_first": "x" * 10_000_000, "examples_seen": True}
    fields, update = screen_reply(_reply(**meta), lambda r: None)
    assert fields["status"] == "ok" and update is not None
    assert fields["steps"] == 3 and fields["train_loss"] != fields["train_loss"]  # NaN kept: a diverged loss
    dropped = fields["dropped_metrics"]
    assert set(dropped) == {"flops", "seconds", "peak_memory_bytes", "train_loss_first", "examples_seen"}
    assert len(json.dumps(fields)) < 2000  # the 10 MB string is not logged
    assert "flops" not in fields and "seconds" not in fields


# --------------------------------------------------------------------------- the aggregate and the global model


def test_an_aggregate_that_overflows_keeps_the_previous_global_state_and_strategy_buffers():
    from fedtune.rounds import aggregate
    from fedtune.strategies import FedAvgM

    glob = {"a": torch.full((3,), -3e38)}
    strategy = FedAvgM(server_lr=1.0, momentum=0.5)
    state, aggregated, note = aggregate(strategy, glob, [({"a": torch.zeros(3)}, 1.0)], min_replies=1)
    assert aggregated and torch.isfinite(state["a"]).all()
    velocity = strategy.velocity["a"].clone()
    # Finite updates of 3e38: global - mean = -6e38 overflows float32.
    new, aggregated, note = aggregate(strategy, state, [({"a": torch.full((3,), 3e38)}, 5.0)], min_replies=1)
    assert not aggregated and "NaN/Inf" in note and new is state
    assert torch.equal(strategy.velocity["a"], velocity)  # the poisoned momentum step was undone


def test_a_non_finite_global_model_stops_the_run_keeping_the_last_good_round():
    from fedtune.progress import Bars
    from fedtune.rounds import RoundLoop, ServerHooks

    saved, log = [], []
    hooks = ServerHooks(evaluate=lambda s: 0.5, log=log.append, save=lambda s, r: saved.append(r), bars=Bars(quiet=True))
    loop = RoundLoop(hooks, "test", nodes=[0], rounds=3, clients_per_round=1, seed=0, eval_every=1)
    rounds = iter(loop)
    rnd, _ = next(rounds)
    loop.end(rnd, {"a": torch.ones(2)}, replies=1, sampled=1, aggregated=True)
    rnd, _ = next(rounds)
    with pytest.raises(ValueError, match="round 2: the global state holds NaN/Inf.*round 1 are kept"):
        loop.end(rnd, {"a": torch.tensor([1.0, float("nan")])}, replies=1, sampled=1, aggregated=True)
    assert saved == [1]  # round 2 was neither saved nor checkpointed
