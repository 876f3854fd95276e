"""What a FedLLM client keeps between rounds, and how it wraps its messages: SCAFFOLD's control variate
(`fedtune.scaffold`) and compression's view of the global state and residual (`fedtune.compression`).

The state is a dict of tensors: ``view`` and ``residual`` (flat float32 vectors) and ``control/<key>``. In
memory it lives on the client object; in a checkpointed run it is also kept by round in a
`checkpoint.ClientStore` (``<run>/fedpeft-clients``), so that a round the server redoes after a restart starts
from the state the client had before it (as KD's private adapters do). Networked runtimes (Flower, several
processes) do not carry it: `needs` refuses them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from . import scaffold
from .checkpoint import ClientStore, resumes
from .checkpoint import enabled as checkpointing
from .compression import ClientLink, ServerLink
from .strategies import CONTROL

State = dict[str, torch.Tensor]
CONTROL_STATE = "control/"


def needed(config) -> bool:
    """Whether the clients of this run keep state between rounds (SCAFFOLD, or compression)."""
    return config.federation.strategy == "scaffold" or config.compression.kind != "none"


def needs(config, runtime: str) -> str | None:
    """Why `runtime` cannot run this config (its clients' state would be lost between rounds), or None."""
    if runtime == "local" or not needed(config):
        return None
    what = "federation.strategy = 'scaffold'" if config.federation.strategy == "scaffold" else \
        f"compression.kind = {config.compression.kind!r}"
    return (f"{what} keeps state on each client between rounds, which runtime {runtime!r} does not carry yet: run "
            "it on the local runtime (runtime.kind: local, one process).")


def initial_payload(adapter: State, config) -> State:
    """What every party holds before round 1: the initial adapter (and SCAFFOLD's zero control variate)."""
    if config.federation.strategy != "scaffold":
        return dict(adapter)
    return {**adapter, **{CONTROL + k: torch.zeros(t.shape) for k, t in adapter.items()}}


def server_link(config, adapter: State) -> ServerLink:
    """The server's end of the compression link (identity when ``compression.kind`` is none)."""
    return ServerLink(config.compression, initial_payload(adapter, config), config.seed)


def store_dir(ctx) -> Path | None:
    """Where clients of a checkpointed run keep their state by round (``<run>/fedpeft-clients``), or None."""
    if not needed(ctx.config) or not checkpointing(ctx.config) or ctx.path == Path("."):
        return None
    folder = ctx.path / "fedpeft-clients"
    if not resumes(ctx.path, ctx.config):
        shutil.rmtree(folder, ignore_errors=True)
    return folder


class ClientState:
    """One client's state between rounds and the two wraps of its round (`open`, `close`).

    Args:
        node: The client's id.
        config: The run's config (``federation.strategy``, ``compression``, ``train.lr``, ``seed``).
        adapter: The initial adapter (every party builds it from the seed).
        store: Where a checkpointed run keeps the state by round, or None.
    """

    def __init__(self, node: int, config, adapter: State, store: ClientStore | None = None) -> None:
        self.node = node
        self.scaffold = config.federation.strategy == "scaffold"
        self.lr = config.train.lr
        self.link = ClientLink(config.compression, initial_payload(adapter, config), config.seed)
        self.store = store
        self.state: State = {}
        self._start: tuple[int, State] | None = None
        self._view: State = {}
        self._control: State = {}

    def open(self, rnd: int, tensors: dict[str, torch.Tensor]) -> State:
        """The adapter to train from, given the tensors of round `rnd`'s message (decompressed, control split off)."""
        if self.store is not None:
            self._start = self.store.before(rnd)
            self.state = dict(self._start[1]) if self._start is not None else {}
        payload = self.link.receive(tensors, self.state)
        self._view = payload
        adapter, self._control = scaffold.split(payload) if self.scaffold else (payload, {})
        return adapter

    def correct(self, runner, model) -> None:
        """SCAFFOLD: load ``c - c_i`` into the runner's correction buffers for this round's steps."""
        if self.scaffold:
            scaffold.set_correction(runner, model, self._control, self.client_control())

    def client_control(self) -> State:
        """This client's control variate ``c_i`` (zero before its first round)."""
        return {k: self.state.get(CONTROL_STATE + k, torch.zeros(t.shape)) for k, t in self._control.items()}

    def close(self, rnd: int, adapter: State, steps: int) -> State:
        """The reply's tensors (SCAFFOLD's ``delta c_i`` added, compressed); saves the state of this round."""
        reply = dict(adapter)
        if self.scaffold:
            x = {k: t for k, t in self._view.items() if not k.startswith(CONTROL)}
            c_i = self.client_control()
            new = scaffold.option_two(c_i, self._control, x, adapter, steps, self.lr)
            reply.update({CONTROL + k: new[k] - c_i[k] for k in new})
            self.state.update({CONTROL_STATE + k: v for k, v in new.items()})
        wire = self.link.send(self.node, rnd, reply, self._view, self.state)
        if self.store is not None:
            self.store.save(rnd, self.state, self._start)
        return wire
