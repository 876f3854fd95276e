"""The callers of the model service over gRPC: a `fedtune.model_service.ModelAPI` whose transport is a channel.

`RemoteModelService` is what the experiment layer hands a paradigm as ``services.model_service`` when
``runtime.model_server`` is set: ``connect(identity)`` gives that identity's API, with credentials read
from the environment (`ENV`: the same files as the split service's, under ``FEDTUNE_MODEL_*`` names).
"""

from __future__ import annotations

import os

import grpc

from ..model_service import ModelAPI
from .split_auth import DEFAULT_MAX_MESSAGE_BYTES, ENV as SPLIT_ENV, Credentials
from .model_service import SERVICE

ENV = {"ca": "FEDTUNE_MODEL_CA", "cert": "FEDTUNE_MODEL_CERT", "key": "FEDTUNE_MODEL_KEY",
       "token_file": "FEDTUNE_MODEL_TOKEN_FILE"}
"""Environment variables a caller reads its credentials from (``{identity}`` in a path is replaced)."""

CALL_TIMEOUT_S = 600.0


class ModelServiceError(ConnectionError):
    """A call to the model service failed (refused, invalid, unreachable, or past its deadline)."""


def grpc_transport(address: str, credentials: Credentials, *, timeout: float = CALL_TIMEOUT_S,
                   max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
    """``(method, payload) -> payload`` over one channel to the service at `address`."""
    channel = credentials.channel(address, max_bytes)
    metadata = credentials.metadata()
    calls = {m: channel.unary_unary(f"/{SERVICE}/{m}") for m in ("Info", "Infer")}

    def transport(method: str, raw: bytes) -> bytes:
        if method not in calls:
            raise ModelServiceError(f"model service at {address}: no method {method!r}")
        try:
            return calls[method](raw, metadata=metadata, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            code = err.code().name if hasattr(err, "code") else "ERROR"
            raise ModelServiceError(f"model service at {address}: {code}: {err.details()}") from None

    transport.close = channel.close  # type: ignore[attr-defined]
    return transport


def credentials_from_env(identity: str, env=os.environ) -> Credentials:
    return Credentials.from_env(identity, {SPLIT_ENV[k]: env[v] for k, v in ENV.items() if env.get(v)})


class RemoteModelService:
    """The model service at `address`: each caller connects as its own identity."""

    def __init__(self, address: str) -> None:
        self.address = address

    def connect(self, identity: str) -> ModelAPI:
        return ModelAPI(grpc_transport(self.address, credentials_from_env(identity)))
