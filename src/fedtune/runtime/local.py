"""In-process simulation runtime: every client is a function called in turn.

With ``serialize=True`` (the default) each message really goes through
`wire.encode` and `wire.decode` both ways, exactly as it would over a network,
so a malformed reply is rejected by the same code. With ``serialize=False``
messages are handed over as objects (no copies, for GPU speed); sizes are still
exact because paradigms count them with `wire.encoded_size`.

`BatchedLocalGrid` hands a round's messages to a batch function in groups
(``runtime.batch_clients``: several clients trained in one pass, `fedtune.multilora`).
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence

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
        return self._outbound(dst, reply)

    def _outbound(self, dst: int, reply: Message) -> Message:
        reply.meta.setdefault("src", dst)
        if not self.serialize:
            return reply
        try:
            return decode(encode(reply), max_bytes=self.max_bytes)
        except WireError as err:
            return error_reply(dst, f"rejected reply: {err}")


BatchApp = Callable[[Sequence[Message]], list[Message]]
"""Runs several clients' messages at once and returns one reply per message, in order."""


class BatchedLocalGrid(LocalGrid):
    """A `LocalGrid` that runs the clients of a round in groups of up to ``batch_size`` through ``run_batch``.

    ``parallel`` is true, so the round loops send the whole round in one call. If a group's
    batched run raises, its messages are delivered one by one instead, so only a client that
    fails on its own gets an error reply (and the batched failure is reported as a warning).
    """

    parallel = True

    def __init__(self, apps: Mapping[int, ClientApp], run_batch: BatchApp, batch_size: int, *,
                 serialize: bool = True, max_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__(apps, serialize=serialize, max_bytes=max_bytes)
        if batch_size < 1:
            raise ValueError(f"runtime.batch_clients = {batch_size} is not allowed: it must be a positive integer.")
        self.run_batch = run_batch
        self.batch_size = batch_size

    def send_and_receive(self, messages: list[Message]) -> list[Message]:
        replies: list[Message | None] = [None] * len(messages)
        ready: list[tuple[int, Message]] = []
        for i, msg in enumerate(messages):
            if int(msg.meta["dst"]) not in self.apps:
                replies[i] = self._deliver(msg)
                continue
            try:
                ready.append((i, decode(encode(msg), max_bytes=self.max_bytes) if self.serialize else msg))
            except WireError as err:
                replies[i] = error_reply(int(msg.meta["dst"]), f"{type(err).__name__}: {err}")
        for start in range(0, len(ready), self.batch_size):
            group = ready[start: start + self.batch_size]
            try:
                outs = self.run_batch([m for _, m in group])
                if len(outs) != len(group):
                    raise RuntimeError(f"run_batch returned {len(outs)} replies for {len(group)} messages")
            except Exception as err:
                warnings.warn(f"batched run of clients {[int(m.meta['dst']) for _, m in group]} failed "
                              f"({type(err).__name__}: {err}); running them one by one", RuntimeWarning, stacklevel=2)
                for i, _ in group:
                    replies[i] = self._deliver(messages[i])
                continue
            for (i, msg), out in zip(group, outs):
                replies[i] = self._outbound(int(msg.meta["dst"]), out)
        return replies
