"""The split main server bounds what one client can make it do: batch, length, steps, idle time, whose session."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from fedtune.runtime import split_auth as auth
from fedtune.runtime import split_client as remote
from fedtune.split_model import Cut, MainServer
from fedtune.split_session import Activations, LocalMainServer, Session
from fedtune.train.local_steps import TrainSettings
from fedtune.wire import Message, WireError
from test_split_service import TIMEOUT, creds, fed_server, pki, small, start_service  # noqa: F401 (fixtures)


def _act(b: int, s: int, hidden: int, step: int = 1, steps: int = 2) -> Message:
    return Message({"activations": torch.zeros(b, s, hidden), "attention_mask": torch.ones(b, s, dtype=torch.bool),
                    "labels": torch.ones(b, s, dtype=torch.int32)},
                   {"kind": "split_act", "round": 1, "step": step, "steps": steps})


@pytest.fixture()
def main_server(tiny):
    from fedtune import config as cfg
    from fedtune.models import attach_lora

    model = attach_lora(tiny[0], cfg.PeftConfig(), 0)
    settings = TrainSettings(local_steps=2, local_epochs=None, batch_size=2, lr=0.01, count_flops=False)
    yield MainServer(model, Cut(model, None), settings, device=torch.device("cpu"), count_flops=False), model.config
    model.unload()


def test_a_batch_over_the_configured_batch_size_or_length_is_refused(main_server):
    main, mc = main_server
    want = Activations(torch.float32, mc.hidden_size, mc.vocab_size, max_batch=2, max_length=8)
    for b, s in [(3, 4), (1, 9)]:
        session = Session(main, want, 1, 0)
        with pytest.raises(WireError, match="over the main server's limit of train.batch_size = 2 x data.max_length = 8"):
            session.handle(_act(b, s, mc.hidden_size))
        assert session.status == "rejected"
    Session(main, want, 1, 0).handle(_act(2, 8, mc.hidden_size))  # at the limit: a step


def test_more_steps_than_a_round_has_are_refused(main_server):
    main, mc = main_server
    session = Session(main, Activations(torch.float32, mc.hidden_size, mc.vocab_size), 1, 0, max_steps=4)
    with pytest.raises(WireError, match="announced 200 steps, over the 4"):
        session.handle(_act(1, 4, mc.hidden_size, steps=200))


def test_a_stream_needs_its_sessions_key_and_only_one_stream_gets_it(main_server):
    main, mc = main_server
    local = LocalMainServer(main, Activations(torch.float32, mc.hidden_size, mc.vocab_size))
    key = local.begin(1, 0)
    with pytest.raises(WireError, match="did not present the key"):
        local.dial(0, "")  # a node's identity (or token) alone does not open its session
    with pytest.raises(WireError, match="did not present the key"):
        local.dial(0, "0" * 32)
    local.dial(0, key)
    with pytest.raises(WireError, match="has not opened a session"):
        local.dial(0, key)  # a replayed key finds the session taken
    local.finish(1, 0)


def test_token_only_mode_warns_on_the_client_and_is_refused_off_loopback(monkeypatch):
    c = auth.Credentials("node-0", token="t" * 32)
    monkeypatch.delenv(auth.ENV["insecure"], raising=False)
    with pytest.raises(ValueError, match="FEDTUNE_SPLIT_CA is not set.*clear text.*FEDTUNE_SPLIT_INSECURE=1"):
        c.channel("10.1.2.3:50051", 1024)
    with pytest.warns(UserWarning, match="without TLS: bearer tokens travel in clear text"):
        c.channel("127.0.0.1:50051", 1024).close()
    monkeypatch.setenv(auth.ENV["insecure"], "1")
    with pytest.warns(UserWarning, match="clear text"):
        c.channel("10.1.2.3:50051", 1024).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # TLS: no warning
        auth.Credentials("node-0", ca=b"x", token="t" * 32).channel("10.1.2.3:1", 1024).close()


def test_over_grpc_a_stream_without_its_key_is_refused_and_an_idle_one_is_cut_off(tiny, pki, small):
    server, address, service = start_service(tiny, pki, small[0])
    service.idle_timeout = 0.5
    fed = fed_server(address, pki, service.main.cut, service.main.model)
    node0 = creds(pki, auth.node_identity(0))
    try:
        fed.begin(1, 0)
        with pytest.raises(remote.SplitServiceError, match="PERMISSION_DENIED.*key of its session"):
            with remote.StepStream(address, node0, timeout=TIMEOUT) as stream:
                stream.exchange(Message({}, {"kind": "split_act"}), expect={})
        fed.finish(1, 0)
        key = fed.begin(2, 0)
        stream = remote.StepStream(address, node0, timeout=TIMEOUT, session_key=key)
        deadline = time.monotonic() + TIMEOUT
        while not service.session_running and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.0)  # the client sends nothing
        assert not service.session_running  # the watchdog cut the stream off
        report = fed.finish(2, 0)
        assert report["status"] == "rejected" and "idle timeout" in report["error"]
        stream.close()
    finally:
        fed.close()
        server.stop(grace=None).wait(TIMEOUT)
