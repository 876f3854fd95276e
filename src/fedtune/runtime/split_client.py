"""The callers of split learning's main-server service: a client's step stream and the fed server's handle.

`StepStream` is a client's side of one session (``split_act`` up, ``split_grad`` down, exact byte
counts); `RemoteMainServer` is what the fed server's round loop needs of a main server (``begin``,
``finish``, ``state``, ``take_compute``) over gRPC; `RemoteServices` hands both to the paradigm, as
`fedtune.split_session.LocalServices` does in process.
"""

from __future__ import annotations

import os
import queue
import secrets
from typing import Any

import grpc
import torch

from ..split_model import SERVER
from ..train.adapter import adapter_state
from ..wire import Message, WireError, decode, encode, spec_of
from .split_auth import (CALL_TIMEOUT_S, DEFAULT_MAX_MESSAGE_BYTES, ENV, FED_SERVER, SERVICE, SESSION_TIMEOUT_S,
                         Credentials, node_identity)


class SplitServiceError(ConnectionError):
    """A call to the split service failed (refused, invalid, unreachable, or past its deadline)."""


def _describe(address: str, err: grpc.RpcError) -> SplitServiceError:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return SplitServiceError(f"split service at {address}: {code.name if code else 'ERROR'}: {details}")


class StepStream:
    """A client's side of one session: send ``split_act``, receive ``split_grad``, with exact byte counts."""

    _END = object()

    def __init__(self, address: str, credentials: Credentials, *, timeout: float = SESSION_TIMEOUT_S,
                 max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, session_key: str = "") -> None:
        self.address = address
        self.max_bytes = max_bytes
        self.bytes_up = self.bytes_down = 0
        self._channel = credentials.channel(address, max_bytes)
        self._outbox: queue.Queue = queue.Queue()
        call = self._channel.stream_stream(f"/{SERVICE}/Step")
        metadata = [*credentials.metadata(), ("fedtune-session", session_key)]
        self._replies = call(iter(self._outbox.get, self._END), metadata=metadata, timeout=timeout)

    def exchange(self, msg: Message, expect=None) -> Message:
        """Send one message and return the reply, decoded within ``max_bytes`` as views of the payload
        (`wire.decode`).

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


def dial(address: str, node: int, session_key: str = "") -> StepStream:
    """A client node's stream to the service, with credentials and deadline from the environment (`ENV`) and
    the key of its session (from its ``split_fit_ins``)."""
    timeout = float(os.environ.get(ENV["timeout"], SESSION_TIMEOUT_S))
    return StepStream(address, Credentials.from_env(node_identity(node)), timeout=timeout, session_key=session_key)


class RemoteMainServer:
    checkpointable = False  # the top adapter and its optimizer live in the service's process

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

    def begin(self, rnd: int, node: int, max_steps: int | None = None) -> str:
        """Open the service's next session for (round, node); returns the key its client must present."""
        key = secrets.token_hex(16)
        self._call("Begin", {"round": rnd, "node": node, "cut_layer": self.cut.layer, "u_shaped": self.cut.u_shaped,
                             "wire_dtype": str(self.wire_dtype).removeprefix("torch."), "session_key": key,
                             "max_steps": max_steps})
        return key

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


class RemoteServices:
    """Split learning's services when the main server is the gRPC service at `address`.

    The fed server gets a `RemoteMainServer` (credentials of ``fed-server`` from the environment), checked
    to be reachable and to hold the top adapter this run's model describes; each client dials the service
    with its own node's credentials.
    """

    def __init__(self, address: str, model) -> None:
        self.address, self.model = address, model

    def main_server(self, cut, want, settings) -> RemoteMainServer:
        expect = spec_of(cut.part(adapter_state(self.model), SERVER))
        main = RemoteMainServer(self.address, Credentials.from_env(FED_SERVER), cut=cut, wire_dtype=want.dtype,
                                expect=expect)
        try:
            main.state()  # reachable, authenticated, and holding the top adapter this config describes
        except (SplitServiceError, WireError) as err:
            main.close()
            tls = "" if os.environ.get(ENV["ca"]) else (
                f" {ENV['ca']} is not set, so this process dialled without TLS: if the service runs with --tls-cert, "
                f"set {ENV['ca']} to the CA that signed its certificate.")
            raise ValueError(f"runtime.split_server = {self.address!r}: {err}.{tls} Start the service with "
                             "`fedtune split-server --config <this config> --port <port>` or fix the address.") from None
        return main

    def dial(self, node: int, session_key: str = "") -> StepStream:
        return dial(self.address, node, session_key)
