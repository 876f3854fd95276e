"""The one interface between paradigms and runtimes.

A paradigm's server talks to its clients only through a `Grid`: it addresses
`Message`s to node ids and gets replies back. Runtimes (the in-process
simulation, Flower, ...) implement it; paradigms never import a runtime, so the
same round loop runs in simulation and over a network.

A reply whose ``meta["kind"] == "error"`` says the node failed (it raised,
timed out, or sent a payload that could not be decoded); ``meta["error"]``
holds the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .wire import Message

ClientApp = Callable[[Message], Message]
"""A client's side of a paradigm: takes the server's message, returns the reply."""


class Grid(Protocol):
    def node_ids(self) -> list[int]:
        """The ids of the client nodes that are connected."""
        ...

    def send_and_receive(self, messages: list[Message]) -> list[Message]:
        """Deliver each message to ``meta["dst"]`` and return one reply per message, in order."""
        ...


def error_reply(dst: int, reason: str) -> Message:
    """The reply a runtime substitutes when a node fails."""
    return Message({}, {"kind": "error", "src": dst, "error": reason})


def is_error(reply: Message) -> bool:
    return reply.meta.get("kind") == "error"
