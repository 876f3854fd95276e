"""In-process simulation runtime: every client is a function called in turn.

With ``serialize=True`` (the default) each message really goes through
`wire.encode` and `wire.decode` both ways, exactly as it would over a network,
so a malformed reply is rejected by the same code. With ``serialize=False``
messages are handed over as objects (no copies, for GPU speed); sizes are still
exact because paradigms count them with `wire.encoded_size`.

`BatchedLocalGrid` hands a round's messages to a batch function in groups
(``runtime.batch_clients``: several clients trained in one pass, the paradigm's ``batched`` runner).
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence

from ..grid import ClientApp, as_app, error_reply
from ..wire import DEFAULT_MAX_BYTES, Message, WireError, decode, encode


class LocalGrid:
    """A `Grid` whose nodes are client apps living in this process.

    In process a call cannot be cut short, so ``timeout`` is accepted and not enforced (a client
    app that never returns is a bug in this process, not a slow node).
    """

    parallel = False

    def __init__(self, apps: Mapping[int, ClientApp], *, serialize: bool = True, max_bytes: int = DEFAULT_MAX_BYTES):
        self.apps = {node: as_app(app) for node, app in apps.items()}
        self.serialize = serialize
        self.max_bytes = max_bytes

    def node_ids(self) -> list[int]:
        return sorted(self.apps)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        return list(self.stream(messages, timeout))

    def stream(self, messages: Sequence[Message], timeout: float | None = None) -> Iterator[Message]:
        """The replies to `messages`, in order, each yielded as soon as it is taken.

        Client app k+1 is started (`ClientApp.start`) before reply k is taken: on a GPU the next
        client's steps are queued before the host waits for this one's, and the caller screens reply
        k while they run. Apps run in message order either way, so results do not change.
        """
        pending = None
        for msg in messages:
            started = self._start(msg)
            if pending is not None:
                yield self._finish(*pending)
            pending = started
        if pending is not None:
            yield self._finish(*pending)

    def _deliver(self, msg: Message) -> Message:
        return self._finish(*self._start(msg))

    def _start(self, msg: Message) -> tuple[int, Callable[[], Message]]:
        """Decode and hand over one message; return its destination and what gives its reply."""
        dst = int(msg.meta["dst"])
        if dst not in self.apps:
            missing = error_reply(dst, f"no node {dst} in this grid (nodes: {self.node_ids()})")
            return dst, lambda: missing
        try:
            inbound = decode(encode(msg), max_bytes=self.max_bytes) if self.serialize else msg
            return dst, self.apps[dst].start(inbound)
        except Exception as err:  # a client's failure must never take the server down
            failed = _failure(dst, err)
            return dst, lambda: failed

    def _finish(self, dst: int, take: Callable[[], Message]) -> Message:
        try:
            reply = take()
        except Exception as err:
            return _failure(dst, err)
        return self._outbound(dst, reply)

    def _outbound(self, dst: int, reply: Message) -> Message:
        reply.meta.setdefault("src", dst)
        if not self.serialize:
            return reply
        try:
            return decode(encode(reply), max_bytes=self.max_bytes)
        except WireError as err:
            return error_reply(dst, f"rejected reply: {err}")


def _failure(dst: int, err: Exception) -> Message:
    return error_reply(dst, f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}")


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

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
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
