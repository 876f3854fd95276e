"""Split learning over the gRPC main-server service, on 127.0.0.1: equal to the in-process runtime, exact bytes,
mutual TLS and tokens, refusals, size limits; every server is shut down."""

from __future__ import annotations

import copy
import datetime
import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedtune
from conftest import REPO
from fedtune import config as cfg
from fedtune.experiment import prepare_data
from fedtune.models import attach_lora
from fedtune.paradigms import fedpeft, split
from fedtune.progress import Bars
from fedtune.runtime import split_auth as auth
from fedtune.runtime import split_client as remote
from fedtune.runtime import split_service as svc
from fedtune.runtime.local import LocalGrid
from fedtune.split_model import CLIENT, SERVER, Cut, MainServer
from fedtune.strategies import FedAvg
from fedtune.wire import Message, encode, encoded_size
from fedtune.rounds import ServerHooks
from fedtune.train.adapter import adapter_state
from helpers import Recording

# One thread here as in the split-server subprocess (OMP_NUM_THREADS=1): the same float reduction order,
# which the 1e-6 comparisons with the local runtime need (Adam amplifies 1e-7 differences).
pytestmark = [pytest.mark.deploy, pytest.mark.usefixtures("one_thread")]

CPU = torch.device("cpu")
TIMEOUT = 30.0
# 2 clients, 1 round of 2 steps each, short sequences: seconds on 2 CPU cores
SMALL = ["model.name=tiny-llama", "data.demo_train_size=60", "data.demo_test_size=12", "federation.num_clients=2",
         "federation.clients_per_round=2", "federation.rounds=1", "federation.paradigm=split", "train.local_steps=2",
         "train.batch_size=4", "train.lr=0.01", "data.max_length=32", "eval.base=false", "eval.max_examples=12"]


# --------------------------------------------------------------------------- certificates and tokens


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(common_name: str, issuer=None, *, server: bool = False):
    """(cert PEM, key PEM, (cert, key) objects): self-signed CA when issuer is None, else signed by issuer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    signer_cert, signer_key = issuer if issuer else (None, key)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(signer_cert.subject if signer_cert else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(signer_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), (cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the service's certificate, one per identity, a rogue CA's node-0, tokens; all also written to files."""
    folder = tmp_path_factory.mktemp("pki")
    ca_pem, _, ca = _issue("fedtune test CA")
    out = {"dir": folder, "ca": ca_pem, "server": _issue("split-server", ca, server=True)[:2]}
    identities = [auth.node_identity(0), auth.node_identity(1), auth.FED_SERVER]
    for ident in identities:
        out[ident] = _issue(ident, ca)[:2]
    _, _, rogue_ca = _issue("rogue CA")
    out["rogue"] = _issue(auth.node_identity(0), rogue_ca)[:2]
    out["tokens"] = {ident: os.urandom(16).hex() for ident in identities}
    (folder / "ca.pem").write_bytes(ca_pem)
    for name, (cert, key) in [("server", out["server"])] + [(i, out[i]) for i in identities]:
        (folder / f"{name}.pem").write_bytes(cert)
        (folder / f"{name}.key").write_bytes(key)
    for ident, token in out["tokens"].items():
        (folder / f"{ident}.token").write_text(token + "\n")
    (folder / "tokens.txt").write_text("".join(f"{i} {t}\n" for i, t in out["tokens"].items()))
    return out


def creds(pki, identity: str, *, cert_of: str | None = None, token_of: str | None = None) -> auth.Credentials:
    """`identity`'s credentials, optionally with another identity's certificate or token."""
    cert, key = pki[cert_of or identity]
    return auth.Credentials(identity, ca=pki["ca"], cert=cert, key=key, token=pki["tokens"].get(token_of or identity))


# --------------------------------------------------------------------------- an in-process service (a thread)


@pytest.fixture(scope="module")
def small(tiny):
    return cfg.load(None, SMALL), prepare_data(cfg.load(None, SMALL), tiny[1], Bars(quiet=True))


def start_service(tiny, pki, config, max_bytes=auth.DEFAULT_MAX_MESSAGE_BYTES):
    """The service on its own copy of the tiny base (the test's clients use the cached one), TLS + mTLS + tokens."""
    model = attach_lora(copy.deepcopy(tiny[0]), config.peft, config.seed)
    cut = Cut(model, config.split.cut_layer, u_shaped=config.split.u_shaped)
    settings = fedpeft.fedpeft_settings(type("Ctx", (), {"config": config}))
    main = MainServer(model, cut, settings, device=CPU, count_flops=config.train.count_flops)
    want = split.Activations(torch.float32, model.config.hidden_size, model.config.vocab_size)
    service = svc.SplitService(main, want, tokens=pki["tokens"], mtls=True, max_bytes=max_bytes)
    server, port = svc.start_server(service, "127.0.0.1:0",
                                    auth.ServerSecurity(*pki["server"], ca=pki["ca"], tokens=pki["tokens"]))
    return server, f"127.0.0.1:{port}", service


@pytest.fixture()
def service(tiny, pki, small):
    server, address, service = start_service(tiny, pki, small[0])
    yield address, service.main
    server.stop(grace=None).wait(TIMEOUT)


@pytest.fixture()
def clients_model(tiny, small):
    model = attach_lora(tiny[0], small[0].peft, small[0].seed)
    yield model
    model.unload()


def make_clients(model, tok, data, config, pki, address):
    cut = Cut(model, config.split.cut_layer)
    settings = fedpeft.fedpeft_settings(type("Ctx", (), {"config": config}))
    return cut, {i: split.SplitClient(i, model, [data.train[j] for j in data.parts[i]], settings, cut=cut,
                                      wire_dtype=torch.float32, device=CPU, pad_id=tok.pad_token_id, seed=config.seed,
                                      dial=lambda node, key="": remote.StepStream(
                                          address, creds(pki, auth.node_identity(node)), timeout=TIMEOUT,
                                          session_key=key))
                 for i in range(len(data.parts))}


def fed_server(address, pki, cut, model):
    return remote.RemoteMainServer(address, creds(pki, auth.FED_SERVER), cut=cut, wire_dtype=torch.float32,
                                expect=fedtune.wire.spec_of(cut.part(adapter_state(model), SERVER)),
                                timeout=TIMEOUT)


def test_bytes_are_the_payload_lengths_on_both_ends_and_a_bad_client_is_not_averaged(tiny, pki, small, service,
                                                                                     clients_model):
    address, main = service
    config, data = small
    cut, clients = make_clients(clients_model, tiny[1], data, config, pki, address)

    def nan_on_step_2(msg):  # client 1 sends NaN activations on its second step: the service rejects them
        original = clients[1]._forward

        def forward():
            act = original()
            if act.meta["step"] == 2:
                act.tensors["activations"][0, 0, 0] = float("nan")
            return act

        clients[1]._forward = forward
        return clients[1](msg)

    grid = Recording(LocalGrid({0: clients[0], 1: nan_on_step_2}))
    fed = fed_server(address, pki, cut, clients_model)
    init = cut.part(adapter_state(clients_model), CLIENT)
    top_before = fed.state()
    log: list[dict] = []
    hooks = ServerHooks(evaluate=lambda s: 0.0, log=log.append, save=lambda s, r: None, bars=Bars(quiet=True))
    try:
        final, _ = split.serve(grid, init, fed, FedAvg(), split.Activations(torch.float32, 64, clients_model.config.vocab_size), rounds=1,
                               clients_per_round=2, seed=0, eval_every=1, hooks=hooks)
        top_after = fed.state()
    finally:
        fed.close()
    records = {r["client"]: r for r in log if r["type"] == "client"}
    ok, bad = records[0], records[1]
    assert ok["status"] == "ok" and ok["server_steps"] == ok["steps"] == 2
    (fit_ins, fit_res) = [(m, r) for m, r in grid.log if r.meta.get("src") == 0][0]
    assert fit_ins.kind == "split_fit_ins" and fit_res.kind == "fit_res"
    # the service counted the stream's payloads as received/sent; the client counted what it encoded/received
    assert ok["stream_bytes_up"] == fit_res.meta["stream_bytes_up"] > 0
    assert ok["stream_bytes_down"] == fit_res.meta["stream_bytes_down"] > 0
    # the record is the Grid's two messages (exact encodings) plus the stream
    assert ok["bytes_down"] == len(encode(fit_ins)) + ok["stream_bytes_down"]
    assert ok["bytes_up"] == len(encode(fit_res)) + ok["stream_bytes_up"]
    # per step up: activations (b, s, 64) fp32 + mask (bool) + labels (int32) + header; down: the gradient + header
    per_step_up = ok["stream_bytes_up"] / 2
    assert per_step_up > 4 * 8 * (64 * 4 + 1 + 4)
    # client 1: the service rejected step 2, the client failed, its adapter is not averaged
    assert bad["status"] == "rejected" and "NaN" in bad["error"]
    assert bad["server_steps"] == 1
    (returned,) = [r.tensors for _, r in grid.log if r.kind == "fit_res"]
    for k in init:
        torch.testing.assert_close(final[k], returned[k], rtol=0, atol=0)
    # the service trained its top on 2 + 1 valid steps
    assert any(not torch.equal(v, top_before[k]) for k, v in top_after.items())
    for k, v in top_after.items():
        torch.testing.assert_close(v, main.state()[k], rtol=0, atol=0)


def test_callers_without_valid_credentials_are_refused(pki, service):
    address, _ = service
    act = Message({"activations": torch.zeros(1, 2, 64)}, {"kind": "split_act"})

    def step_status(credentials) -> str:
        with pytest.raises(remote.SplitServiceError) as err:
            with remote.StepStream(address, credentials, timeout=TIMEOUT) as stream:
                stream.exchange(act, expect={})
        return str(err.value)

    node0 = auth.node_identity(0)
    # certificate from another CA: the TLS handshake fails
    assert "UNAVAILABLE" in step_status(creds(pki, node0, cert_of="rogue"))
    # no client certificate at all: refused by the handshake too
    assert "UNAVAILABLE" in step_status(auth.Credentials(node0, ca=pki["ca"], token=pki["tokens"][node0]))
    # another node's token, a missing token
    assert "UNAUTHENTICATED" in step_status(creds(pki, node0, token_of=auth.node_identity(1)))
    assert "UNAUTHENTICATED" in step_status(auth.Credentials(node0, ca=pki["ca"], cert=pki[node0][0],
                                                            key=pki[node0][1]))
    # node 0's token but node 1's certificate
    assert "PERMISSION_DENIED" in step_status(creds(pki, node0, cert_of=auth.node_identity(1)))
    # valid, but the fed server has opened no session for node 0
    assert "FAILED_PRECONDITION" in step_status(creds(pki, node0))
    # a client may not call the fed server's methods
    node_as_fed = remote.RemoteMainServer(address, creds(pki, node0), cut=None, wire_dtype=torch.float32, expect=None,
                                       timeout=TIMEOUT)
    with pytest.raises(remote.SplitServiceError, match="PERMISSION_DENIED"):
        node_as_fed.state()
    node_as_fed.close()


def test_an_oversize_message_is_refused_and_the_service_goes_on(tiny, pki, small):
    server, address, service = start_service(tiny, pki, small[0], max_bytes=64 * 1024)
    main = service.main
    fed = fed_server(address, pki, main.cut, main.model)
    try:
        before = main.state()
        key = fed.begin(1, 0)
        big = Message({"activations": torch.zeros(1, 512, 64)}, {"kind": "split_act"})  # 128 KiB > 64 KiB
        assert encoded_size(big) > 64 * 1024
        with pytest.raises(remote.SplitServiceError, match="RESOURCE_EXHAUSTED"):
            with remote.StepStream(address, creds(pki, auth.node_identity(0)), timeout=TIMEOUT,
                                   session_key=key) as stream:
                stream.exchange(big, expect={})
        report = fed.finish(1, 0)
        assert report["status"] == "incomplete" and report["server_steps"] == 0
        # the service still answers, and its top adapter is untouched
        for k, v in fed.state().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    finally:
        fed.close()
        server.stop(grace=None).wait(TIMEOUT)


def test_a_stalled_session_is_cut_off_when_the_fed_server_finishes_it(tiny, pki, small):
    import time

    server, address, service = start_service(tiny, pki, small[0])
    fed = fed_server(address, pki, service.main.cut, service.main.model)
    try:
        key = fed.begin(1, 0)
        stream = remote.StepStream(address, creds(pki, auth.node_identity(0)), timeout=TIMEOUT, session_key=key)
        deadline = time.monotonic() + TIMEOUT
        while not service.session_running and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until the service has taken the stream (it holds the session lock)
        assert service.session_running
        started = time.monotonic()
        report = fed.finish(1, 0)  # the client never sent a step
        assert time.monotonic() - started < 5
        assert report["status"] == "incomplete" and report["server_steps"] == 0
        with pytest.raises(remote.SplitServiceError, match="CANCELLED"):
            stream.exchange(Message({}, {"kind": "split_act"}), expect={})
        stream.close()
        fed.state()  # the service is free again
    finally:
        fed.close()
        server.stop(grace=None).wait(TIMEOUT)


# --------------------------------------------------------------------------- the CLI service, end to end


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _client_records(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["client"]: r for r in rows if r["type"] == "client"}


def _use_credentials_from(folder: Path, monkeypatch) -> None:
    """The environment a fed server and its clients read their credentials from (files per identity)."""
    for var, name in [("ca", "ca.pem"), ("cert", "{identity}.pem"), ("key", "{identity}.key"),
                      ("token_file", "{identity}.token")]:
        monkeypatch.setenv(auth.ENV[var], str(folder / name))
    monkeypatch.setenv(auth.ENV["timeout"], str(TIMEOUT))


def _assert_same_as_local(tmp_path: Path, local: dict, remote_run: dict) -> None:
    """The remote run trained exactly as the local one: same combined adapter, losses, steps, about the bytes."""
    a, b = _adapter(tmp_path / "local"), _adapter(tmp_path / "remote")
    assert a.keys() == b.keys() and len(a) > 0
    # both sides trained: LoRA B starts at zero, so non-zero B matrices on either side of the cut prove steps ran
    # (tiny-llama: 2 layers, default cut 1, so layers.1 is the service's; LoRA targets no head here)
    trained = {("top" if "layers.1." in k else "bottom") for k, v in a.items() if "lora_B" in k and v.abs().sum() > 0}
    assert trained == {"top", "bottom"}
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert remote_run["accuracy"] == pytest.approx(local["accuracy"], abs=1e-9)
    loc, rem = _client_records(tmp_path / "local"), _client_records(tmp_path / "remote")
    assert sorted(rem) == [0, 1]
    for node in rem:
        assert rem[node]["status"] == "ok" and rem[node]["server_steps"] == loc[node]["server_steps"] == 2
        assert rem[node]["train_loss"] == pytest.approx(loc[node]["train_loss"], abs=1e-6)
        # the split traffic is the same messages as in process, plus a little routing metadata
        assert abs(rem[node]["bytes_up"] - loc[node]["bytes_up"]) < 512
        assert abs(rem[node]["bytes_down"] - loc[node]["bytes_down"]) < 512
        assert rem[node]["stream_bytes_up"] > 0 and rem[node]["stream_bytes_down"] > 0


def test_split_over_the_cli_service_equals_the_local_runtime(tmp_path, pki, monkeypatch):
    config = tmp_path / "split.yaml"
    config.write_text(cfg.to_yaml(cfg.load(None, SMALL)))
    local = fedtune.run(cfg.load(config), out=tmp_path / "local", quiet=True)

    d = pki["dir"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "fedtune.cli", "split-server", "--config", str(config), "--host", "127.0.0.1",
         "--port", "0", "--tls-cert", str(d / "server.pem"), "--tls-key", str(d / "server.key"),
         "--tls-ca", str(d / "ca.pem"), "--token-file", str(d / "tokens.txt")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()  # blocks until the service listens (or the process dies)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, f"split-server did not start: {line!r} {server.stderr.read() if server.poll() else ''}"
        _use_credentials_from(d, monkeypatch)
        remote_run = fedtune.run(cfg.load(config, [f"runtime.split_server=127.0.0.1:{match[1]}"]),
                                 out=tmp_path / "remote", quiet=True)
    finally:
        server.terminate()
        try:
            server.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode == 0, server.stderr.read()
    _assert_same_as_local(tmp_path, local, remote_run)


def test_u_shaped_split_over_the_service_equals_the_local_runtime(tmp_path, tiny, pki, monkeypatch):
    # The service in a thread on its own copy of the base (what build_service does, minus the shared cache).
    config = cfg.load(None, SMALL + ["split.u_shaped=true"])
    local = fedtune.run(config, out=tmp_path / "local", quiet=True)
    server, address, _ = start_service(tiny, pki, config)
    try:
        _use_credentials_from(pki["dir"], monkeypatch)
        remote_run = fedtune.run(cfg.load(None, SMALL + ["split.u_shaped=true", f"runtime.split_server={address}"]),
                                 out=tmp_path / "remote", quiet=True)
    finally:
        server.stop(grace=None).wait(TIMEOUT)
    _assert_same_as_local(tmp_path, local, remote_run)


@pytest.mark.parametrize("flags, error", [
    ([], "needs authentication"),
    (["--tls-cert", "server.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-ca", "ca.pem", "--token-file", "tokens.txt"], "--tls-ca needs --tls-cert"),
    (["--token-file", "short.txt"], "at least 16 characters"),
    (["--token-file", "missing.txt"], "--token-file missing.txt: No such file"),
    (["--token-file", "tokens.txt"], "without --tls-cert/--tls-key on --host 0.0.0.0: bearer tokens travel in clear"),
], ids=["no-auth", "cert-without-key", "ca-without-tls", "short-token", "missing-file", "tokens-in-clear-text"])
def test_split_server_verb_refuses_bad_security_flags_before_loading_anything(tmp_path, pki, flags, error,
                                                                              monkeypatch):
    from fedtune.cli import main

    config = tmp_path / "split.yaml"
    config.write_text(cfg.to_yaml(cfg.load(None, SMALL)))
    (tmp_path / "short.txt").write_text("node-0 abc\n")
    for name in ("server.pem", "ca.pem", "tokens.txt"):
        (tmp_path / name).write_bytes((pki["dir"] / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("fedtune.models.load_base", no_model)
    with pytest.raises(ValueError, match=error):
        main(["split-server", "--config", str(config), "--port", "0", "--debug", *flags])
