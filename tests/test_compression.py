"""Update compression: decode(encode(x)) within the stated bound, error feedback carries the residual,
bytes are the real encoded message's, stochastic rounding is unbiased, both ends' views agree."""

from __future__ import annotations

import pytest
import torch

from fedtune import compression as cz
from fedtune.wire import Message, WireError, encode, encoded_size


def x_of(n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.logspace(-4, 0, n)  # magnitudes over four decades


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_round_trip_within_one_step(kind):
    x = x_of(1000)  # not a multiple of the block: a padded last block
    wire = cz.encode(x, kind, generator=torch.Generator().manual_seed(1))
    y = cz.decode(wire, kind, x.numel())
    step = cz.bound(x, kind)
    assert bool(((y - x).abs() <= step + 1e-7).all())
    # The bound is the block's absmax / L, by hand for the first block.
    assert float(step[0]) == pytest.approx(float(x[:cz.BLOCK].abs().max()) / cz.LEVELS[kind])
    assert float((y - x).abs().max()) > 0  # lossy: the test could fail


def test_topk_keeps_the_largest_entries_exactly():
    x = x_of(1000)
    y = cz.decode(cz.encode(x, "topk", ratio=0.05), "topk", 1000, ratio=0.05)
    top = set(torch.topk(x.abs(), 50).indices.tolist())
    assert set(torch.nonzero(y).flatten().tolist()) == top
    idx = torch.tensor(sorted(top))
    assert torch.equal(y[idx], x[idx])


@pytest.mark.parametrize("kind,per_value", [("topk", None), ("int8", 1.0), ("int4", 0.5)])
def test_bytes_are_the_encoded_message(kind, per_value):
    n = 10_000
    msg = Message(cz.encode(x_of(n), kind, ratio=0.01), {"kind": "fit_res", "round": 1})
    payload = encode(msg)
    assert encoded_size(msg) == len(payload)
    data = sum(t.numel() * t.element_size() for t in msg.tensors.values())
    want = 100 * 8 if kind == "topk" else n * per_value + 4 * (-(-n // cz.BLOCK))
    assert data == want and len(payload) < data + 400  # the rest is a short JSON header
    assert len(payload) < 0.3 * len(encode(Message({"u": x_of(n)}, msg.meta)))


def test_stochastic_rounding_is_unbiased():
    x = x_of(512, seed=3)
    draws = torch.stack([cz.decode(cz.encode(x, "int4", generator=torch.Generator().manual_seed(s)), "int4", 512)
                         for s in range(2000)])
    step = cz.bound(x, "int4")
    # Each draw errs by at most one step: the mean of 2000 is within 5 standard errors (step/2/sqrt(2000)).
    assert bool(((draws.mean(0) - x).abs() <= 5 * step / 2 / 2000 ** 0.5 + 1e-7).all())
    # Round-to-nearest would be biased: the mean error would not shrink; here it does, on every entry.
    assert float((draws.mean(0) - x).abs().max()) < 0.1 * float(step.max())


def test_error_feedback_carries_the_residual():
    conf = cz.CompressionConfig(kind="topk", ratio=0.1, direction="up")
    init = {"a": torch.zeros(40), "b": torch.zeros(2, 5)}
    client, server = cz.ClientLink(conf, init, seed=0), cz.ServerLink(conf, init, seed=0)
    state: dict = {}
    sent_total = torch.zeros(50)
    spec = cz.spec_of(init)
    updates = []
    for rnd in (1, 2, 3):
        view = server.send(0, rnd, init)  # uncompressed down: the client's view is the payload
        reply = {"a": x_of(40, rnd), "b": x_of(10, 10 + rnd).view(2, 5)}
        u = cz.flatten(reply, spec)
        previous = state.get("residual", torch.zeros(50))
        wire = client.send(0, rnd, reply, client.receive(view, state), state)
        got = cz.flatten(server.receive(0, wire, spec), spec)
        # What was not sent this round is exactly the residual kept for the next.
        torch.testing.assert_close(state["residual"], u + previous - got)
        sent_total += got
        updates.append(u)
    # Telescoping: everything sent plus the last residual is everything the client meant to send.
    torch.testing.assert_close(sent_total + state["residual"], sum(updates))


def test_down_views_agree_and_the_server_keeps_the_residual():
    conf = cz.CompressionConfig(kind="int4", direction="down")
    init = {"w": torch.zeros(300)}
    server, client = cz.ServerLink(conf, init, 7), cz.ClientLink(conf, init, 7)
    state: dict = {}
    target = {"w": x_of(300, 5)}
    for rnd in (1, 2, 3):
        got = client.receive(server.send(2, rnd, target), state)
        torch.testing.assert_close(got["w"], server.sent[2]["w"], rtol=0, atol=0)
    # Each round sends what is left of target - view: the view closes in on the target.
    assert float((got["w"] - target["w"]).abs().max()) < float(cz.bound(target["w"], "int4").max()) / 7
    restored = cz.ServerLink(conf, init, 7)
    restored.load_state_dict(server.state_dict())
    torch.testing.assert_close(restored.views[2], server.views[2])


def test_decode_rejects_malformed_updates():
    wire = cz.encode(x_of(100), "topk", ratio=0.1)
    with pytest.raises(WireError, match="indices"):
        cz.decode({**wire, "idx": wire["idx"] + 1000}, "topk", 100, ratio=0.1)
    with pytest.raises(WireError, match="expected"):
        cz.decode(wire, "topk", 100, ratio=0.2)
    with pytest.raises(WireError, match="tensors"):
        cz.decode({"q": wire["val"]}, "int8", 100)


def test_config_checks():
    from fedtune import config as cfg
    with pytest.raises(ValueError, match="compression.ratio"):
        cfg.load(None, ["model.name=tiny-llama", "compression.kind=topk", "compression.ratio=0"])
    with pytest.raises(ValueError, match="federation.paradigm"):
        cfg.load(None, ["model.name=tiny-llama", "compression.kind=int8", "federation.paradigm=kd"])
    assert cfg.load(None, ["model.name=tiny-llama"]).compression.kind == "none"
