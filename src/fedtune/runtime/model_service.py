"""The inference-only model service over gRPC (`fedtune model-server`): `fedtune.model_service.ModelServer`
behind TLS and per-caller tokens.

Two unary methods, ``Info`` and ``Infer``, on ``fedtune.model.Inference``; each request and reply is one
`fedtune.wire.encode`d Message (generic handlers with raw bytes, as the split service has: no generated
code, no pickle). Callers authenticate as in `fedtune.runtime.split_auth`: a bearer token bound to their
identity (``node-<id>``, ``fed-server``) and/or a client certificate whose common name is that identity.
A refused or malformed request is answered with a gRPC error that says why (UNAUTHENTICATED,
PERMISSION_DENIED, INVALID_ARGUMENT) and the service goes on serving the others. Requests run one at a
time (a lock); what leaves the service is only what `ModelServer` returns: losses and logits.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Mapping
from concurrent import futures

import grpc

from ..model_service import ModelServer
from ..wire import WireError, decode, encode
from .split_auth import DEFAULT_MAX_MESSAGE_BYTES, ServerSecurity, channel_options, listen

SERVICE = "fedtune.model.Inference"


def require_authentication(tokens, mtls: bool) -> None:
    if tokens is None and not mtls:
        raise ValueError("the model service needs authentication: give it a token file (--token-file) and/or "
                         "a CA for client certificates (--tls-ca).")


def authenticate(context: grpc.ServicerContext, tokens: Mapping[str, str] | None, mtls: bool) -> str:
    """The caller's identity, or the call aborted (no identity, wrong token, certificate for someone else)."""
    md = dict(context.invocation_metadata())
    identity = md.get("fedtune-identity", "")
    if not identity:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "no fedtune-identity metadata (node-<id> or fed-server)")
    if tokens is not None:
        expected = tokens.get(identity, "")
        given = md.get("authorization", "")
        given = given[len("Bearer "):] if given.startswith("Bearer ") else ""
        if not (hmac.compare_digest(given.encode(), expected.encode()) and expected):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"no valid bearer token for identity {identity!r}")
    if mtls:
        names = context.auth_context().get("x509_common_name", [])
        if identity.encode() not in names:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"the client certificate is not issued to {identity!r}")
    return identity


class ModelService:
    """The gRPC servicer around a `ModelServer`.

    Args:
        server: Answers the requests (holds the model; nothing else here does).
        tokens: Identity -> bearer token; None = no tokens (then mutual TLS must authenticate).
        mtls: Client certificates are required; their common name must equal the claimed identity.
        max_bytes: Largest request accepted or reply sent.
    """

    def __init__(self, server: ModelServer, *, tokens: Mapping[str, str] | None, mtls: bool,
                 max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        require_authentication(tokens, mtls)
        self.server = server
        self.tokens = dict(tokens) if tokens is not None else None
        self.mtls = mtls
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            m: grpc.unary_unary_rpc_method_handler(self._method(m)) for m in ("Info", "Infer")})

    def _method(self, name: str):
        def call(raw: bytes, context) -> bytes:
            authenticate(context, self.tokens, self.mtls)
            try:
                msg = decode(raw, max_bytes=self.max_bytes)
                with self._lock:
                    reply = self.server.handle(name, msg)
                return encode(reply)
            except WireError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"rejected: {err}")
        return call


def start_server(service: ModelService, address: str, security: ServerSecurity) -> tuple[grpc.Server, int]:
    """Serve `service` on ``address`` (port 0 picks a free port); returns the started server and its port."""
    security.check()
    if service.mtls != (security.ca is not None) or service.tokens != security.tokens:
        raise ValueError("the service's authentication (mtls, tokens) must match the server's security settings.")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[service.handler()],
                         options=channel_options(service.max_bytes))
    return server, listen(server, address, security)


def build_service(config, *, tokens=None, mtls: bool = False, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
                  ) -> ModelService:
    """The service for a config: its base model (``model.*``) loaded as `fedtune run` loads it, no adapter."""
    from ..models import load_base, resolve_device

    require_authentication(tokens, mtls)  # before the model is loaded
    m = config.model
    device = resolve_device(m.device)
    model, _ = load_base(m.name, dtype=m.dtype, device=device, attn_implementation=m.attn_implementation)
    return ModelService(ModelServer(model, device, count_flops=config.train.count_flops), tokens=tokens, mtls=mtls,
                        max_bytes=max_bytes)
