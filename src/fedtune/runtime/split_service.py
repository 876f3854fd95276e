"""Split learning's main server as a gRPC service: the per-step traffic bypasses the fed server's Grid.

Over a network the fed server's Grid (Flower) adds seconds per message, far too slow for split
learning's one round trip per training step. So the main server runs as this service, and each
client, once the fed server has sent it ``split_fit_ins`` through the Grid, streams its steps straight
to it, one bidirectional stream (``Step``) per client-round. The protocol is `fedtune.split_session`'s,
the same as in process: every stream message is one `fedtune.wire.encode`d Message (safetensors bytes
+ JSON header, never pickle), handed to the very same `split_session.Session`; this module adds
authentication (`split_auth`), bytes, locks and deadlines around it.

The fed server drives the order with unary calls, so results are deterministic and equal the
in-process runtime's:

* ``Begin(round, node, session_key, max_steps)``: the next session belongs to that node, whose stream must
  present the session's key (sent to the client in its ``split_fit_ins``) and take at most max_steps steps;
  any other stream is refused;
* ``Finish(round, node)``: closes it and returns the session's report (status, steps, losses, exact
  stream bytes up and down as ``len`` of the payloads, the server's FLOPs and seconds);
* ``State``: the top adapter state (to evaluate and save the combined adapter).

Sessions run one at a time (a lock). Both sides bound message sizes (gRPC limits and ``wire.decode``'s
``max_bytes``); the session bounds a step's batch and length (the config's ``train.batch_size`` and
``data.max_length``) and the steps of a round; a stream idle for ``idle_timeout`` seconds is cut off;
client calls carry deadlines; keepalive pings detect dead peers.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Mapping
from concurrent import futures

import grpc

from .. import experiment, registry
from ..models import DTYPES, backbone
from ..split_model import Cut, MainServer
from ..split_session import Activations, Session
from ..train.local_steps import settings_from
from ..wire import Message, WireError, decode, encode, meta_number
from .split_auth import (CALL_TIMEOUT_S, DEFAULT_MAX_MESSAGE_BYTES, IDLE_TIMEOUT_S, FED_SERVER, SERVICE, ServerSecurity,
                         channel_options, listen, node_identity, require_authentication)


class SplitService:
    """The gRPC servicer around a `MainServer` (``forward_backward`` per step; U-shaped ``forward``, ``backward``).

    Args:
        main: The main server (top part, its adapter and optimizer).
        want: What activations must look like (wire dtype, hidden size, vocabulary size).
        tokens: Identity -> bearer token; None = no tokens (then mutual TLS must authenticate).
        mtls: Client certificates are required; their common name must equal the claimed identity.
        max_bytes: Largest message accepted or sent.
        max_steps: Most steps a session may take, whatever the fed server asks (None: as the fed server says).
        idle_timeout: Seconds a stream may wait between two messages before it is cut off.
    """

    def __init__(self, main, want, *, tokens: Mapping[str, str] | None, mtls: bool,
                 max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_steps: int | None = None,
                 idle_timeout: float = IDLE_TIMEOUT_S) -> None:
        require_authentication(tokens, mtls)
        self.max_steps = max_steps  # the service's own bound on a round's steps (its config's train.local_steps)
        self.idle_timeout = idle_timeout
        self.main = main
        self.want = want
        self.tokens = dict(tokens) if tokens is not None else None
        self.mtls = mtls
        self.max_bytes = max_bytes
        self._guard = threading.Lock()  # protects _expected / _active
        self._one_session = threading.Lock()  # sessions run one at a time
        self._expected: Session | None = None
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
        try:
            begin = Message({}, meta)
            rnd = int(meta_number(begin, "round", integer=True))
            node = meta.get("node")
            if isinstance(node, bool) or not isinstance(node, int) or node < 0:
                raise WireError(f"Begin's node must be an integer >= 0, got {node!r:.40}")
            key = meta.get("session_key")
            if not isinstance(key, str) or len(key) < 16:
                raise WireError("Begin needs a session_key of at least 16 characters")
            steps = [v for v in (meta.get("max_steps"), self.max_steps) if v is not None]
            max_steps = int(min(meta_number(Message({}, {"s": v}), "s", integer=True) for v in steps)) if steps else None
        except (WireError, TypeError, ValueError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid Begin request: {err}")
        with self._guard:
            self._cancel_active()
            self._expected = Session(self.main, self.want, rnd, node, key=key, max_steps=max_steps)
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
        report = session.close()
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
        key = dict(context.invocation_metadata()).get("fedtune-session", "")
        with self._guard:
            session = self._expected
            if session is None or node_identity(session.node) != identity:
                expected = "none" if session is None else node_identity(session.node)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"the fed server has not opened a session for {identity} (open: {expected})")
            try:
                session.admit(session.node, key)  # one stream per session, holding its key
            except WireError as err:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        if not self._one_session.acquire(timeout=CALL_TIMEOUT_S):
            context.abort(grpc.StatusCode.ABORTED, "another session is still running")
        try:
            with self._guard:
                self._active = context
            idle = _Watchdog(context, self.idle_timeout)
            for raw in idle.watch(requests):
                if self._expected is not session:
                    context.abort(grpc.StatusCode.CANCELLED, "the fed server closed this session")
                session.bytes_up += len(raw)
                try:
                    reply = encode(session.handle(decode(raw, max_bytes=self.max_bytes)))
                except WireError as err:
                    session.status, session.error = "rejected", str(err)[:500]
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rejected: {err}")
                session.bytes_down += len(reply)
                # `finished` is set before the yield: a client that has its last reply may cancel the call at
                # once, and grpc then never resumes this generator.
                finished = session.finished
                yield reply
                if finished:
                    return
        finally:
            if "idle" in locals():
                idle.stop()
                if idle.fired:
                    session.status = "rejected"
                    session.error = f"the client sent nothing for {self.idle_timeout:g} s (the service's idle timeout)"
            self.main.abandon()  # a U-shaped forward left without its gradient takes no step
            with self._guard:
                self._active = None
            self._one_session.release()


class _Watchdog:
    """Cancels a stream that sends nothing for `timeout` seconds (a client that announces many steps and
    streams slowly would otherwise hold the one session open until its deadline)."""

    def __init__(self, context, timeout: float) -> None:
        self.context, self.timeout = context, timeout
        self.last = time.monotonic()
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, requests):
        for raw in requests:
            self.last = time.monotonic()
            yield raw
            self.last = time.monotonic()  # the service's own work on the step is not idle time

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() - self.last > self.timeout:
                self.fired = True
                self.context.cancel()
                return

    def stop(self) -> None:
        self._stop.set()


def start_server(service: SplitService, address: str, security: ServerSecurity) -> tuple[grpc.Server, int]:
    """Serve `service` on ``address`` (port 0 picks a free port); returns the started server and its port."""
    security.check()
    if service.mtls != (security.ca is not None) or service.tokens != security.tokens:
        raise ValueError("the service's authentication (mtls, tokens) must match the server's security settings: "
                         "build both from one ServerSecurity (see build_service).")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[service.handler()],
                         options=channel_options(service.max_bytes) + [
                             # accept the clients' keepalive pings (every 30 s), even between calls
                             ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
                             ("grpc.keepalive_permit_without_calls", 1),
                         ])
    return server, listen(server, address, security)


def build_service(config, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, tokens=None, mtls: bool = False,
                  idle_timeout: float = IDLE_TIMEOUT_S):
    """The service for a run config, its model loaded exactly as `experiment.setup` loads it.

    Same seed, same base, same LoRA initialisation, so the top adapter starts equal to the one an in-process
    run would train, and a networked run reproduces the in-process one.
    """
    c = config
    if not registry.get(c.federation.paradigm).long_exchanges:
        raise ValueError(f"federation.paradigm = {c.federation.paradigm!r}: the split server serves split "
                         "learning configs only (federation.paradigm = 'split').")
    require_authentication(tokens, mtls)  # before the model is loaded
    model, _, device = experiment.load_model(c)
    cut = Cut(model, c.split.cut_layer, u_shaped=c.split.u_shaped)
    settings = settings_from(c)
    main = MainServer(model, cut, settings, device=device, count_flops=settings.count_flops)
    body = backbone(model).config
    # The service's memory is bounded by its own config: the batch, the length, the steps of a round.
    want = Activations(DTYPES[c.split.wire_dtype], body.hidden_size, body.vocab_size,
                       max_batch=c.train.batch_size, max_length=c.data.max_length)
    return SplitService(main, want, tokens=tokens, mtls=mtls, max_bytes=max_bytes, max_steps=settings.local_steps,
                        idle_timeout=idle_timeout)
