"""Who may talk to split learning's main-server service, and how callers prove it.

Callers authenticate with a bearer token bound to their identity (``node-<id>`` or ``fed-server``,
sent as ``fedtune-identity`` metadata) and/or mutual TLS, whose client certificate's common name must
equal that identity. A caller reads its credentials from the environment (`ENV`); the service reads
its token file and TLS material from the command line (`ServerSecurity`).
"""

from __future__ import annotations

import ipaddress
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

SERVICE = "fedtune.split.MainServer"
FED_SERVER = "fed-server"
"""The identity of the fed server (clients are ``node-<id>``)."""

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024**2
"""Largest stream or unary message either side accepts unless told otherwise (256 MiB)."""

SESSION_TIMEOUT_S = 3600.0
"""Default deadline of one client-round's stream (env ``FEDTUNE_SPLIT_TIMEOUT``)."""

IDLE_TIMEOUT_S = 300.0
"""Default seconds a client's stream may sit between two messages (``fedtune split-server --idle-timeout``)."""

CALL_TIMEOUT_S = 60.0
"""Deadline of the fed server's unary calls."""

ENV = {
    "ca": "FEDTUNE_SPLIT_CA",
    "cert": "FEDTUNE_SPLIT_CERT",
    "key": "FEDTUNE_SPLIT_KEY",
    "token_file": "FEDTUNE_SPLIT_TOKEN_FILE",
    "timeout": "FEDTUNE_SPLIT_TIMEOUT",
    "insecure": "FEDTUNE_SPLIT_INSECURE",
}
"""Environment variables a client (or the fed server) reads its settings from; file paths may contain
``{identity}``, replaced by ``node-<id>`` or ``fed-server``."""


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` (or a bare host) names this machine: localhost, 127.0.0.0/8 or ::1."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


CLEAR_TEXT = ("bearer tokens travel in clear text without TLS: anyone on the network path can read one and "
              "replay it")
"""What both sides say about token-only mode."""


def node_identity(node: int) -> str:
    """The identity a client node authenticates as."""
    return f"node-{node}"


def channel_options(max_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


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
        options = channel_options(max_bytes) + [
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
            if self.token:
                insecure = env_flag(ENV["insecure"])
                if not is_loopback(address) and not insecure:
                    raise ValueError(f"{self.identity}: {ENV['ca']} is not set, so the split service at {address} would "
                                     f"be dialled without TLS and {CLEAR_TEXT}. Set {ENV['ca']} to the CA of the "
                                     f"service's certificate, or {ENV['insecure']}=1 on a network you trust.")
                warnings.warn(f"{self.identity}: dialling the split service at {address} without TLS: {CLEAR_TEXT} "
                              f"(set {ENV['ca']} to use TLS)", stacklevel=2)
            return grpc.insecure_channel(address, options=options)
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                             certificate_chain=self.cert)
        return grpc.secure_channel(address, creds, options=options)

    def metadata(self) -> list[tuple[str, str]]:
        md = [("fedtune-identity", self.identity)]
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        return md


def env_flag(name: str, env: Mapping[str, str] = os.environ) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


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


def require_authentication(tokens, mtls: bool) -> None:
    if tokens is None and not mtls:
        raise ValueError("the split service needs authentication: give it a token file (--token-file) and/or "
                         "a CA for client certificates (--tls-ca).")


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


def listen(server: grpc.Server, address: str, security: ServerSecurity) -> int:
    """Bind `server` to ``address`` with TLS (client certificates when a CA is set) or in plain text, start it,
    and return its port (``:0`` picks a free one); ValueError when the address cannot be bound."""
    if security.cert is not None:
        creds = grpc.ssl_server_credentials([(security.key, security.cert)], root_certificates=security.ca,
                                            require_client_auth=security.ca is not None)
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ValueError(f"cannot listen on {address}: is the port in use?")
    server.start()
    return port
