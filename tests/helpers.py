"""Small test doubles shared by several test files."""

from __future__ import annotations


class Recording:
    """A Grid that remembers every (message, reply) pair it carried."""

    def __init__(self, grid) -> None:
        self.grid = grid
        self.log: list = []

    def node_ids(self):
        return self.grid.node_ids()

    def send_and_receive(self, messages):
        replies = self.grid.send_and_receive(messages)
        self.log.extend(zip(messages, replies))
        return replies
