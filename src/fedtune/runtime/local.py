"""In-process simulation runtime: every client is a function called in turn.

With ``serialize=True`` (the default) each message really goes through
`wire.encode` and `wire.decode` both ways, exactly as it would over a network,
so a malformed reply is rejected by the same code. With ``serialize=False``
messages are handed over as objects (no copies, for GPU speed); sizes are still
exact because paradigms count them with `wire.encoded_size`.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping

from ..grid import ClientApp, error_reply
from ..wire import DEFAULT_MAX_BYTES, Message, WireError, decode, encode


class LocalGrid:
    """A `Grid` whose nodes are client apps living in this process."""

    def __init__(self, apps: Mapping[int, ClientApp], *, serialize: bool = True, max_bytes: int = DEFAULT_MAX_BYTES):
        self.apps = dict(apps)
        self.serialize = serialize
        self.max_bytes = max_bytes

    def node_ids(self) -> list[int]:
        return sorted(self.apps)

    def send_and_receive(self, messages: list[Message]) -> list[Message]:
        return [self._deliver(m) for m in messages]

    def _deliver(self, msg: Message) -> Message:
        dst = int(msg.meta["dst"])
        if dst not in self.apps:
            return error_reply(dst, f"no node {dst} in this grid (nodes: {self.node_ids()})")
        try:
            inbound = decode(encode(msg), max_bytes=self.max_bytes) if self.serialize else msg
            reply = self.apps[dst](inbound)
        except Exception as err:  # a client's failure must never take the server down
            return error_reply(dst, f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}")
        reply.meta.setdefault("src", dst)
        if not self.serialize:
            return reply
        try:
            return decode(encode(reply), max_bytes=self.max_bytes)
        except WireError as err:
            return error_reply(dst, f"rejected reply: {err}")
