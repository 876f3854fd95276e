"""The one interface between paradigms and runtimes.

A paradigm's server talks to its clients only through a `Grid`: it addresses `Message`s to node
ids and gets replies back. Runtimes (the in-process simulation, Flower, torch.distributed ranks)
implement it; paradigms never import a runtime, so the same round loop runs in simulation and over
a network. What a round loop may rely on is declared here, not probed:

* ``parallel``: the runtime runs a round's clients at the same time, so a round's messages should
  go out in one `send_and_receive` call;
* `stream`: the replies in order, each as soon as it is ready (the local runtime already trains
  the next client while the caller screens this reply);
* a per-call ``timeout`` in seconds (None: the runtime's default); past it a node has failed.

A client's side is a `ClientApp`: called with a message, it returns the reply; `ClientApp.start`
queues the work and returns what gives the reply later (a GPU client queues its steps without
waiting for them).

A reply whose ``meta["kind"] == "error"`` says the node failed (it raised, timed out, or sent a
payload that could not be decoded); ``meta["error"]`` holds the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from .wire import Message


class ClientApp:
    """A client's side of a paradigm: takes the server's message, returns the reply.

    Subclasses implement ``__call__``; those that can queue their work without waiting for it
    (CUDA streams) also override `start`.
    """

    def __call__(self, msg: Message) -> Message:
        raise NotImplementedError

    def start(self, msg: Message) -> Callable[[], Message]:
        """Begin handling `msg`; return the function that waits for the work and gives the reply."""
        reply = self(msg)
        return lambda: reply


class FunctionApp(ClientApp):
    """A plain function ``message -> reply`` as a `ClientApp` (test doubles, small custom clients)."""

    def __init__(self, fn: Callable[[Message], Message]) -> None:
        self.fn = fn

    def __call__(self, msg: Message) -> Message:
        return self.fn(msg)


def as_app(app: ClientApp | Callable[[Message], Message]) -> ClientApp:
    """`app` itself when it is a `ClientApp`, else the function wrapped as one."""
    return app if isinstance(app, ClientApp) else FunctionApp(app)


class Grid(Protocol):
    parallel: bool
    """Whether the clients of one call run at the same time (send a round's messages in one call)."""

    def node_ids(self) -> list[int]:
        """The ids of the client nodes that are connected."""
        ...

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        """Deliver each message to ``meta["dst"]`` and return one reply per message, in order.

        A node that has not replied within ``timeout`` seconds (None: the runtime's default) gets an
        `error_reply`.
        """
        ...

    def stream(self, messages: Sequence[Message], timeout: float | None = None) -> Iterator[Message]:
        """The replies to `messages`, in order, each yielded as soon as it is ready."""
        ...


class SequentialStream:
    """`Grid.stream` for a runtime without its own: one `send_and_receive` call per message."""

    def stream(self, messages: Sequence[Message], timeout: float | None = None) -> Iterator[Message]:
        for m in messages:
            yield from self.send_and_receive([m], timeout)  # type: ignore[attr-defined]


def exchange(grid: Grid, messages: list[Message], advance: Callable[[int], None],
             timeout: float | None = None) -> Iterator[Message]:
    """Send a round's messages and yield the replies in order, as they come; ``advance(n)`` per n replies.

    A ``parallel`` grid gets the whole list in one call (it runs the clients concurrently); any
    other grid streams them (the local runtime overlaps the caller's work on reply k with client
    k+1's training).
    """
    if grid.parallel:
        replies = grid.send_and_receive(messages, timeout)
        advance(len(messages))
        yield from replies
        return
    for reply in grid.stream(messages, timeout):
        advance(1)
        yield reply


def error_reply(dst: int, reason: str) -> Message:
    """The reply a runtime substitutes when a node fails."""
    return Message({}, {"kind": "error", "src": dst, "error": reason})


def is_error(reply: Message) -> bool:
    return reply.meta.get("kind") == "error"
