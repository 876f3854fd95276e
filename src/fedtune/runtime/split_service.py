"""Split learning's main server as a gRPC service: the per-step traffic bypasses the fed server's Grid.

Over a network the fed server's Grid (Flower) adds seconds per message, far too
slow for split learning's one round trip per training step. So the main server
(`fedtune.split_model.MainServer`: blocks [c, L), the norm, the head, their
adapter and optimizer) runs as this service, and each client, once the fed server
has sent it ``split_fit_ins`` through the Grid, streams its steps straight to it:

  client  --split_act-->   service   (activations at the cut, attention mask, labels)
  client  <--split_grad--  service   (gradient at the cut; meta: step, last, loss)

or, U-shaped (the client keeps the norm, the head and the labels), two round trips a step:

  client  --split_act-->       service   (activations at the cut, attention mask)
  client  <--split_top--       service   (the top blocks' output)
  client  --split_top_grad-->  service   (its gradient; meta: loss)
  client  <--split_grad--      service   (gradient at the cut)

one bidirectional stream (``Step``) per client-round. Every stream message is one
`fedtune.wire.encode`d Message (safetensors bytes + JSON header, never pickle),
validated on arrival by the same code as the in-process path (`read_activations`).

The fed server drives the order with unary calls, so results are deterministic
and equal the in-process runtime's:

* ``Begin(round, node)``: the next session belongs to that node; any other node's stream is refused;
* ``Finish(round, node)``: closes it and returns the service's own account of it (status, steps, losses,
  exact stream bytes up and down as ``len`` of the payloads, the server's FLOPs and seconds);
* ``State``: the top adapter state (to evaluate and save the combined adapter).

Sessions run one at a time (a lock). Callers authenticate with a bearer token bound
to their identity (``node-<id>`` or ``fed-server``, sent as ``fedtune-identity``
metadata) and/or mutual TLS, whose client certificate's common name must equal
that identity. Both sides bound message sizes (gRPC limits and ``wire.decode``'s
``max_bytes``); client calls carry deadlines; keepalive pings detect dead peers.
"""

from __future__ import annotations

import hmac
import os
import queue
import threading
import types
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from ..paradigms.split import Activations, meta_number, read_activations
from ..wire import Message, WireError, check, decode, encode

SERVICE = "fedtune.split.MainServer"
FED_SERVER = "fed-server"
"""The identity of the fed server (clients are ``node-<id>``)."""

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024**2
"""Largest stream or unary message either side accepts unless told otherwise (256 MiB)."""

SESSION_TIMEOUT_S = 3600.0
"""Default deadline of one client-round's stream (env ``FEDTUNE_SPLIT_TIMEOUT``)."""

CALL_TIMEOUT_S = 60.0
"""Deadline of the fed server's unary calls."""

ENV = {
    "ca": "FEDTUNE_SPLIT_CA",
    "cert": "FEDTUNE_SPLIT_CERT",
    "key": "FEDTUNE_SPLIT_KEY",
    "token_file": "FEDTUNE_SPLIT_TOKEN_FILE",
    "timeout": "FEDTUNE_SPLIT_TIMEOUT",
}
"""Environment variables a client (or the fed server) reads its settings from; file paths may contain
``{identity}``, replaced by ``node-<id>`` or ``fed-server``."""


def node_identity(node: int) -> str:
    """The identity a client node authenticates as."""
    return f"node-{node}"


def _options(max_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


# --------------------------------------------------------------------------- credentials


@dataclass
class Credentials:
    """How a caller proves who it is to the service and checks that the service is genuine.

    Attributes:
        identity: ``node-<id>`` or ``fed-server``.
        ca: PEM of the CA that signed the service's certificate; TLS is on exactly when set.
        cert, key: The caller's certificate and key (PEM) for mutual TLS.
        token: The bearer token bound to ``identity`` in the service's token file.
    """

    identity: str
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None

    @classmethod
    def from_env(cls, identity: str, env: Mapping[str, str] = os.environ) -> "Credentials":
        """Read the files named by ``FEDTUNE_SPLIT_CA``/``_CERT``/``_KEY``/``_TOKEN_FILE`` (each optional)."""

        def read(what: str) -> bytes | None:
            path = env.get(ENV[what])
            if not path:
                return None
            path = path.replace("{identity}", identity)
            try:
                return Path(path).read_bytes()
            except OSError as err:
                raise ValueError(f"{ENV[what]} = {path!r} cannot be read ({err}); point it at the {what} file.") from None

        token = read("token_file")
        return cls(identity, read("ca"), read("cert"), read("key"), token.decode().strip() if token else None)

    def channel(self, address: str, max_bytes: int) -> grpc.Channel:
        """A channel to the service: TLS (mutual when a cert is set) when a CA is set, plain otherwise."""
        options = _options(max_bytes) + [
            ("grpc.keepalive_time_ms", 30_000),  # a dead service is noticed within ~40 s, mid-step included
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 0),
        ]
        if (self.cert is None) != (self.key is None):
            raise ValueError(f"{self.identity}: a client certificate needs its key and vice versa "
                             f"({ENV['cert']} and {ENV['key']}).")
        if self.ca is None:
            if self.cert is not None:
                raise ValueError(f"{self.identity}: a client certificate is set ({ENV['cert']}) but no CA to check the "
                                 f"service against: set {ENV['ca']} too (TLS needs it).")
            return grpc.insecure_channel(address, options=options)
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                             certificate_chain=self.cert)
        return grpc.secure_channel(address, creds, options=options)

    def metadata(self) -> list[tuple[str, str]]:
        md = [("fedtune-identity", self.identity)]
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        return md


def read_token_file(path: str | Path) -> dict[str, str]:
    """Identity -> token, from lines ``<identity> <token>`` (``#`` starts a comment)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"--token-file {path}: {err.strerror}") from None
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) < 16:
            raise ValueError(f"--token-file {path} line {number}: expected `<identity> <token>` with a token of "
                             f"at least 16 characters (e.g. `node-0 $(openssl rand -hex 16)`).")
        tokens[parts[0]] = parts[1]
    if not tokens:
        raise ValueError(f"--token-file {path} holds no tokens.")
    return tokens


class SplitServiceError(ConnectionError):
    """A call to the split service failed (refused, invalid, unreachable, or past its deadline)."""


def _describe(address: str, err: grpc.RpcError) -> SplitServiceError:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return SplitServiceError(f"split service at {address}: {code.name if code else 'ERROR'}: {details}")


# --------------------------------------------------------------------------- the service


def _require_authentication(tokens, mtls: bool) -> None:
    if tokens is None and not mtls:
        raise ValueError("the split service needs authentication: give it a token file (--token-file) and/or "
                         "a CA for client certificates (--tls-ca).")


@dataclass
class _Session:
    """One client-round as the service sees it; `report` is what ``Finish`` returns."""

    round: int
    node: int
    started: bool = False
    status: str = "waiting"  # waiting | running | ok | rejected | incomplete
    error: str = ""
    steps: int = 0  # announced by the client on its first message
    done: int = 0
    top_shape: tuple[int, ...] | None = None  # U-shaped: a forward awaits its split_top_grad
    bytes_up: int = 0
    bytes_down: int = 0
    losses: list[float] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {"kind": "split_report", "round": self.round, "node": self.node, "status": self.status,
                "error": self.error, "steps": self.steps, "server_steps": self.done, "losses": self.losses,
                "stream_bytes_up": self.bytes_up, "stream_bytes_down": self.bytes_down}


class SplitService:
    """The gRPC servicer around a `MainServer` (``forward_backward`` per step; U-shaped ``forward``, ``backward``).

    Args:
        main: The main server (top part, its adapter and optimizer).
        want: What activations must look like (wire dtype, hidden size, vocabulary size).
        tokens: Identity -> bearer token; None = no tokens (then mutual TLS must authenticate).
        mtls: Client certificates are required; their common name must equal the claimed identity.
        max_bytes: Largest message accepted or sent.
    """

    def __init__(self, main, want, *, tokens: Mapping[str, str] | None, mtls: bool,
                 max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        _require_authentication(tokens, mtls)
        self.main = main
        self.want = want
        self.tokens = dict(tokens) if tokens is not None else None
        self.mtls = mtls
        self.max_bytes = max_bytes
        self._guard = threading.Lock()  # protects _expected / _active
        self._one_session = threading.Lock()  # sessions run one at a time
        self._expected: _Session | None = None
        self._active: grpc.ServicerContext | None = None

    @property
    def session_running(self) -> bool:
        """Whether a client's stream is being served now."""
        return self._active is not None

    def handler(self) -> grpc.GenericRpcHandler:
        """Generic handlers with raw-bytes (de)serializers: no generated code, the payloads are wire Messages."""
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Step": grpc.stream_stream_rpc_method_handler(self._step),
            "Begin": grpc.unary_unary_rpc_method_handler(self._begin),
            "Finish": grpc.unary_unary_rpc_method_handler(self._finish),
            "State": grpc.unary_unary_rpc_method_handler(self._state),
        })

    # ------------------------------------------------------------------ authentication

    def _identity(self, context: grpc.ServicerContext) -> str:
        md = dict(context.invocation_metadata())
        identity = md.get("fedtune-identity", "")
        if not identity:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no fedtune-identity metadata (node-<id> or fed-server)")
        if self.tokens is not None:
            expected = self.tokens.get(identity, "")
            given = md.get("authorization", "")
            given = given[len("Bearer "):] if given.startswith("Bearer ") else ""
            # Compare even for unknown identities, so timing does not tell which identities exist.
            if not (hmac.compare_digest(given.encode(), expected.encode()) and expected):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, f"no valid bearer token for identity {identity!r}")
        if self.mtls:
            names = context.auth_context().get("x509_common_name", [])
            if identity.encode() not in names:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"the client certificate (CN {[n.decode(errors='replace') for n in names]}) is not "
                              f"issued to {identity!r}")
        return identity

    def _fed_server_only(self, context) -> None:
        if self._identity(context) != FED_SERVER:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "only the fed server may call this method")

    def _read(self, raw: bytes, context, what: str) -> Message:
        try:
            return decode(raw, max_bytes=self.max_bytes)
        except WireError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid {what}: {err}")

    # ------------------------------------------------------------------ fed server calls

    def _begin(self, raw: bytes, context) -> bytes:
        self._fed_server_only(context)
        meta = self._read(raw, context, "Begin request").meta
        mine = {"cut_layer": self.main.cut.layer, "u_shaped": self.main.cut.u_shaped,
                "wire_dtype": str(self.want.dtype).removeprefix("torch.")}
        theirs = {k: meta.get(k) for k in mine}
        if theirs != mine:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the service runs split with {mine} but the fed server with {theirs}: start both from "
                          f"the same config")
        with self._guard:
            self._cancel_active()
            self._expected = _Session(int(meta["round"]), int(meta["node"]))
        return encode(Message({}, {"kind": "split_begin"}))

    def _finish(self, raw: bytes, context) -> bytes:
        self._fed_server_only(context)
        meta = self._read(raw, context, "Finish request").meta
        with self._guard:
            session = self._expected
            if session is None or (session.round, session.node) != (meta.get("round"), meta.get("node")):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"no open session for round {meta.get('round')} node {meta.get('node')}")
            self._expected = None  # any later message of this session is refused
            self._cancel_active()
        # Wait for a stream still inside a step to leave it, so the report and the top state are settled.
        if self._one_session.acquire(timeout=CALL_TIMEOUT_S / 2):
            self._one_session.release()
        if session.status in ("waiting", "running"):
            session.status = "incomplete"
            session.error = session.error or f"the stream ended after {session.done} of {session.steps} steps"
        report = session.report()
        report["flops"], report["seconds"] = self.main.take_compute()
        return encode(Message({}, report))

    def _state(self, raw: bytes, context) -> bytes:
        self._fed_server_only(context)
        if not self._one_session.acquire(timeout=CALL_TIMEOUT_S / 2):
            context.abort(grpc.StatusCode.UNAVAILABLE, "a session is still running; ask again after Finish")
        try:
            return encode(Message(self.main.state(), {"kind": "split_state"}))
        finally:
            self._one_session.release()

    def _cancel_active(self) -> None:
        if self._active is not None:
            self._active.cancel()

    # ------------------------------------------------------------------ a client's session

    def _step(self, requests, context):
        identity = self._identity(context)
        with self._guard:
            session = self._expected
            if session is None or node_identity(session.node) != identity or session.started:
                expected = "none" if session is None else node_identity(session.node)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"the fed server has not opened a session for {identity} (open: {expected})")
            session.started = True
        if not self._one_session.acquire(timeout=CALL_TIMEOUT_S):
            context.abort(grpc.StatusCode.ABORTED, "another session is still running")
        try:
            with self._guard:
                self._active = context
            session.status = "running"
            for raw in requests:
                if self._expected is not session:
                    context.abort(grpc.StatusCode.CANCELLED, "the fed server closed this session")
                session.bytes_up += len(raw)
                reply = self._one_step(session, raw, context)
                session.bytes_down += len(reply)
                finished = session.done == session.steps
                if finished:
                    # Before the yield: a client that has its last reply may cancel the call at once, and
                    # grpc then never resumes this generator.
                    session.status = "ok"
                yield reply
                if finished:
                    return
        finally:
            self.main.abandon()  # a U-shaped forward left without its gradient takes no step
            with self._guard:
                self._active = None
            self._one_session.release()

    def _one_step(self, session: _Session, raw: bytes, context) -> bytes:
        """One request of the session: a ``split_act`` (or, U-shaped, a ``split_top_grad``) in, the reply out."""
        u_shaped = self.main.cut.u_shaped
        kind = "split_top_grad" if session.top_shape else "split_act"
        try:
            msg = decode(raw, max_bytes=self.max_bytes)
            if msg.kind != kind or msg.meta.get("round") != session.round:
                raise WireError(f"expected a {kind} of round {session.round}, got a {msg.kind!r} of round "
                                f"{msg.meta.get('round')!r}")
            if session.top_shape:
                if msg.meta.get("step") != session.done + 1:
                    raise WireError(f"expected the top gradient of step {session.done + 1}, got step "
                                    f"{msg.meta.get('step')!r}")
                check(msg, {"top_grad": (session.top_shape, self.want.dtype)})
                loss = meta_number(msg, "loss")
            else:
                steps = int(meta_number(msg, "steps", integer=True))
                if session.done and steps != session.steps:
                    raise WireError(f"the client announced {session.steps} steps, now {steps}")
                session.steps = steps
                act, mask, labels = read_activations(msg, session.done + 1, self.want, with_labels=not u_shaped)
        except WireError as err:
            session.status, session.error = "rejected", str(err)[:500]
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rejected, expecting a {kind}: {err}")
        route = {"round": session.round, "step": session.done + 1}
        if u_shaped and not session.top_shape:
            top = self.main.forward(act, mask)
            session.top_shape = tuple(top.shape)
            return encode(Message({"top_activations": top}, {"kind": "split_top", **route}))
        if u_shaped:
            grad = self.main.backward(msg.tensors["top_grad"])
            session.top_shape = None
        else:
            grad, loss = self.main.forward_backward(act, mask, labels)
        session.done += 1
        session.losses.append(loss)
        return encode(Message({"grad": grad}, {"kind": "split_grad", **route, "last": session.done == session.steps,
                                               "loss": loss}))


@dataclass
class ServerSecurity:
    """The service's TLS material (PEM bytes) and token table."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None  # set: client certificates signed by this CA are required (mutual TLS)
    tokens: dict[str, str] | None = None

    def check(self) -> None:
        """ValueError for an incomplete combination (named by the CLI flags that set it)."""
        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both to turn TLS on.")
        if self.ca is not None and self.cert is None:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key: mutual TLS is TLS with client certificates.")


def start_server(service: SplitService, address: str, security: ServerSecurity) -> tuple[grpc.Server, int]:
    """Serve `service` on ``address`` (port 0 picks a free port); returns the started server and its port."""
    security.check()
    if service.mtls != (security.ca is not None) or service.tokens != security.tokens:
        raise ValueError("the service's authentication (mtls, tokens) must match the server's security settings: "
                         "build both from one ServerSecurity (see build_service).")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[service.handler()],
                         options=_options(service.max_bytes) + [
                             # accept the clients' keepalive pings (every 30 s), even between calls
                             ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
                             ("grpc.keepalive_permit_without_calls", 1),
                         ])
    if security.cert is not None:
        creds = grpc.ssl_server_credentials([(security.key, security.cert)], root_certificates=security.ca,
                                            require_client_auth=security.ca is not None)
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ValueError(f"cannot listen on {address}: is the port in use?")
    server.start()
    return server, port


def build_service(config, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tokens=None, mtls: bool = False):
    """The service for a run config, its model loaded exactly as `experiment.run` loads it.

    Same seed, same base, same LoRA initialisation, so the top adapter starts equal to the one an in-process
    run would train, and a networked run reproduces the in-process one.
    """
    import random

    from ..models import DTYPES, attach_lora, backbone, load_base, resolve_device
    from ..paradigms.fedpeft import settings_from
    from ..split_model import Cut, MainServer

    c = config
    if c.federation.paradigm != "split":
        raise ValueError(f"federation.paradigm = {c.federation.paradigm!r}: the split server serves "
                         "federation.paradigm = 'split' configs only.")
    _require_authentication(tokens, mtls)  # before the model is loaded
    device = resolve_device(c.model.device)
    random.seed(c.seed)
    torch.manual_seed(c.seed)
    base, _ = load_base(c.model.name, dtype=c.model.dtype, device=device,
                        attn_implementation=c.model.attn_implementation)
    model = attach_lora(base, c.peft, c.seed)
    cut = Cut(model, c.split.cut_layer, u_shaped=c.split.u_shaped)
    # settings_from reads only ctx.config
    main = MainServer(model, cut, settings_from(types.SimpleNamespace(config=c)), device=device,
                      count_flops=c.train.count_flops)
    body = backbone(model).config
    want = Activations(DTYPES[c.split.wire_dtype], body.hidden_size, body.vocab_size)
    return SplitService(main, want, tokens=tokens, mtls=mtls, max_bytes=max_bytes)


# --------------------------------------------------------------------------- callers


class StepStream:
    """A client's side of one session: send ``split_act``, receive ``split_grad``, with exact byte counts."""

    _END = object()

    def __init__(self, address: str, credentials: Credentials, *, timeout: float = SESSION_TIMEOUT_S,
                 max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.address = address
        self.max_bytes = max_bytes
        self.bytes_up = self.bytes_down = 0
        self._channel = credentials.channel(address, max_bytes)
        self._outbox: queue.Queue = queue.Queue()
        call = self._channel.stream_stream(f"/{SERVICE}/Step")
        self._replies = call(iter(self._outbox.get, self._END), metadata=credentials.metadata(), timeout=timeout)

    def exchange(self, msg: Message, expect=None) -> Message:
        """Send one message and return the reply, decoded within ``max_bytes``.

        With `expect` (a ``wire.decode`` spec) the reply's tensors are also checked against it; the split
        client passes none, since its step functions check every reply themselves (once per reply).
        """
        raw = encode(msg)
        self.bytes_up += len(raw)
        self._outbox.put(raw)
        try:
            reply = next(self._replies)
        except StopIteration:
            raise SplitServiceError(f"split service at {self.address} closed the stream early") from None
        except grpc.RpcError as err:
            raise _describe(self.address, err) from None
        self.bytes_down += len(reply)
        return decode(reply, expect=expect, max_bytes=self.max_bytes)

    def close(self) -> None:
        self._outbox.put(self._END)
        self._replies.cancel()  # a no-op once the service has ended the stream
        self._channel.close()

    def __enter__(self) -> "StepStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dial(address: str, node: int) -> StepStream:
    """A client node's stream to the service, with credentials and deadline from the environment (`ENV`)."""
    timeout = float(os.environ.get(ENV["timeout"], SESSION_TIMEOUT_S))
    return StepStream(address, Credentials.from_env(node_identity(node)), timeout=timeout)


class RemoteMainServer:
    """The fed server's handle on the service: what the round loop needs of a `MainServer`, over gRPC.

    Args:
        address: host:port of the service.
        credentials: The fed server's credentials (identity ``fed-server``).
        cut: The cut (the fed server checks the service uses the same one).
        wire_dtype: The activations' wire dtype.
        expect: ``wire.decode`` spec of the top adapter state, from the fed server's own model.
    """

    def __init__(self, address: str, credentials: Credentials, *, cut, wire_dtype: torch.dtype,
                 expect, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, timeout: float = CALL_TIMEOUT_S) -> None:
        self.address = address
        self.cut = cut
        self.wire_dtype = wire_dtype
        self.expect = expect
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._metadata = credentials.metadata()
        self._channel = credentials.channel(address, max_bytes)
        self._flops = 0
        self._seconds = 0.0

    def _call(self, method: str, meta: dict[str, Any], expect=None) -> Message:
        call = self._channel.unary_unary(f"/{SERVICE}/{method}")
        try:
            raw = call(encode(Message({}, meta)), metadata=self._metadata, timeout=self.timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            raise _describe(self.address, err) from None
        return decode(raw, expect=expect, max_bytes=self.max_bytes)

    def begin(self, rnd: int, node: int) -> None:
        """Open the service's next session for (round, node)."""
        self._call("Begin", {"round": rnd, "node": node, "cut_layer": self.cut.layer, "u_shaped": self.cut.u_shaped,
                             "wire_dtype": str(self.wire_dtype).removeprefix("torch.")})

    def finish(self, rnd: int, node: int) -> dict[str, Any]:
        """Close the session; returns the service's report (status, steps, losses, stream bytes)."""
        report = self._call("Finish", {"round": rnd, "node": node}).meta
        self._flops += int(report.pop("flops", 0) or 0)
        self._seconds += float(report.pop("seconds", 0.0) or 0.0)
        return report

    def state(self):
        """The service's top adapter state, checked against the expected keys, shapes and dtypes."""
        return self._call("State", {}, expect=self.expect).tensors

    def take_compute(self) -> tuple[int, float]:
        """The service's FLOPs and seconds over the sessions finished since the last call."""
        out = (self._flops, self._seconds)
        self._flops, self._seconds = 0, 0.0
        return out

    def abandon(self) -> None:
        """Nothing to drop: the service ends a failed session itself."""

    def close(self) -> None:
        self._channel.close()
