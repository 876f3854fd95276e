"""Split learning's one protocol: a client streams its steps to the main server, session by session.

Every split client-round runs the same way wherever the main server lives:

* the fed server opens the main server's session for (round, node) (`begin`), sends the client
  ``split_fit_ins`` through its Grid, gets ``fit_res`` back, and closes the session (`finish`),
  which returns the main server's own account of it (status, steps, losses, exact stream bytes);
* in between, the client dials the main server (`dial`) and exchanges one message pair per step:

  client  --split_act-->   main server   (activations at the cut, attention mask, labels)
  client  <--split_grad--  main server   (gradient at the cut; meta: step, last, loss)

  or, U-shaped (the client keeps the norm, the head and the labels), two pairs a step:
  ``split_act`` -> ``split_top`` (the top blocks' output), ``split_top_grad`` (its gradient and the
  loss) -> ``split_grad``.

`Session` is the main server's side of one client-round: it validates every message (names,
shapes, dtypes, finite values, label range, the step order, the announced step count) and runs the
`split_model.MainServer` step. `LocalMainServer` serves sessions in this process (the simulation);
the gRPC service (`fedtune.runtime.split_service`) is authentication and bytes around the very same
`Session`. The experiment layer hands the paradigm one or the other through `LocalServices` or the
runtime's remote services (`fedtune.runtime.split_client.RemoteServices`): the paradigm never knows which.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch

from .data.tasks import IGNORE
from .split_model import Cut, MainServer
from .train.local_steps import TrainSettings
from .wire import Message, WireError, check, decode, encode, encoded_size, meta_number


@dataclass
class Activations:
    """What the main server accepts as a client's cut-layer activations."""

    dtype: torch.dtype  # the wire dtype
    hidden_size: int
    vocab_size: int
    max_batch: int | None = None
    """Most sequences a step may carry (``train.batch_size``): the service's memory is bounded by its config."""
    max_length: int | None = None
    """Most tokens a sequence may have (``data.max_length``)."""


def read_activations(msg: Message, step: int, want: Activations, *, with_labels: bool):
    """Validate a ``split_act`` message; returns (activations, attention_mask, labels or None)."""
    if msg.meta.get("step") != step:
        raise WireError(f"expected the activations of step {step}, got step {msg.meta.get('step')!r}")
    act = msg.tensors.get("activations")
    if act is None or act.dim() != 3 or act.shape[-1] != want.hidden_size or act.numel() == 0:
        shape = None if act is None else tuple(act.shape)
        raise WireError(f"activations must have shape (batch, seq, {want.hidden_size}), got {shape}")
    b, s = act.shape[:2]
    if (want.max_batch is not None and b > want.max_batch) or (want.max_length is not None and s > want.max_length):
        raise WireError(f"a step of {b} sequences x {s} tokens is over the main server's limit of "
                        f"train.batch_size = {want.max_batch} x data.max_length = {want.max_length}")
    spec = {"activations": ((b, s, want.hidden_size), want.dtype), "attention_mask": ((b, s), torch.bool)}
    if with_labels:
        spec["labels"] = ((b, s), torch.int32)
    check(msg, spec)
    labels = msg.tensors.get("labels")
    if labels is not None:
        # Two small reductions a step: the range of the non-ignored labels, and whether any is a target.
        targets = labels != IGNORE
        low, high = torch.aminmax(torch.where(targets, labels, 0))
        if low.item() < 0 or high.item() >= want.vocab_size:
            raise WireError(f"labels must be token ids in [0, {want.vocab_size}) or {IGNORE}")
        if not targets[:, 1:].any().item():
            raise WireError("a training batch has no target tokens: data.max_length is too short for the prompts.")
    return act, msg.tensors["attention_mask"], labels


@dataclass
class Session:
    """The main server's side of one client-round: `handle` takes a client message, returns the reply.

    An invalid message raises `WireError` and leaves the session ``rejected``; `report` is what the
    fed server gets back from ``finish``.
    """

    main: MainServer
    want: Activations
    round: int
    node: int
    key: str = ""
    """The secret the fed server gave this session's client in its ``split_fit_ins`` (`admit`)."""
    max_steps: int | None = None
    """Most steps the client may announce: what the fed server's config gives a round."""
    started: bool = False  # a client's stream has attached to it (one per session)
    status: str = "waiting"  # waiting | running | ok | rejected | incomplete
    error: str = ""
    steps: int = 0  # announced by the client on its first message
    done: int = 0
    top_shape: tuple[int, ...] | None = None  # U-shaped: a forward awaits its split_top_grad
    bytes_up: int = 0
    bytes_down: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status == "ok"

    def admit(self, node: int, key: str) -> None:
        """Attach the stream of `node` presenting `key`; WireError unless it is this session's client, first.

        The key binds a node's stream to the session the fed server opened for it: a node's bearer token
        captured or replayed from another connection does not open a session without it, and one stream
        per session means a replayed key finds the session taken.
        """
        if node != self.node or self.started or self.finished:
            raise WireError(f"the fed server has not opened a session for node {node}")
        if not hmac.compare_digest(str(key).encode(), self.key.encode()):
            raise WireError(f"node {node} did not present the key of its session (the split_fit_ins' session_key)")
        self.started = True

    def handle(self, msg: Message) -> Message:
        """One request: a ``split_act`` (U-shaped: or a ``split_top_grad``) in, its reply out."""
        u_shaped = self.main.cut.u_shaped
        kind = "split_top_grad" if self.top_shape else "split_act"
        self.status = "running"
        try:
            if msg.kind != kind or msg.meta.get("round") != self.round:
                raise WireError(f"expected a {kind} of round {self.round}, got a {msg.kind!r} of round "
                                f"{msg.meta.get('round')!r}")
            if self.top_shape:
                if msg.meta.get("step") != self.done + 1:
                    raise WireError(f"expected the top gradient of step {self.done + 1}, got step "
                                    f"{msg.meta.get('step')!r}")
                check(msg, {"top_grad": (self.top_shape, self.want.dtype)})
                loss = meta_number(msg, "loss")
            else:
                steps = int(meta_number(msg, "steps", integer=True))
                if self.max_steps is not None and steps > self.max_steps:
                    raise WireError(f"the client announced {steps} steps, over the {self.max_steps} a round has "
                                    "(train.local_steps / local_epochs of the fed server's config)")
                if self.done and steps != self.steps:
                    raise WireError(f"the client announced {self.steps} steps, now {steps}")
                self.steps = steps
                act, mask, labels = read_activations(msg, self.done + 1, self.want, with_labels=not u_shaped)
        except WireError as err:
            self.status, self.error = "rejected", str(err)[:500]
            raise
        route = {"round": self.round, "step": self.done + 1}
        if u_shaped and not self.top_shape:
            top = self.main.forward(act, mask)
            self.top_shape = tuple(top.shape)
            return Message({"top_activations": top}, {"kind": "split_top", **route})
        if u_shaped:
            grad = self.main.backward(msg.tensors["top_grad"])
            self.top_shape = None
        else:
            grad, loss = self.main.forward_backward(act, mask, labels)
        self.done += 1
        self.losses.append(loss)
        if self.done == self.steps:
            self.status = "ok"
        return Message({"grad": grad}, {"kind": "split_grad", **route, "last": self.done == self.steps, "loss": loss})

    def close(self) -> dict[str, Any]:
        """End the session (a U-shaped forward left without its gradient takes no step); returns `report`."""
        self.main.abandon()
        if self.status in ("waiting", "running"):
            self.status = "incomplete"
            self.error = self.error or f"the stream ended after {self.done} of {self.steps} steps"
        return self.report()

    def report(self) -> dict[str, Any]:
        return {"kind": "split_report", "round": self.round, "node": self.node, "status": self.status,
                "error": self.error, "steps": self.steps, "server_steps": self.done, "losses": self.losses,
                "stream_bytes_up": self.bytes_up, "stream_bytes_down": self.bytes_down}


class LocalStream:
    """A client's stream to a `LocalMainServer` session: `exchange` one message for its reply.

    With ``serialize`` every message really goes through `wire.encode`/`wire.decode` both ways,
    as over a network; either way the bytes are the exact encoded sizes.
    """

    def __init__(self, server: "LocalMainServer", node: int) -> None:
        self.server, self.node = server, node
        self.bytes_up = self.bytes_down = 0

    def exchange(self, msg: Message) -> Message:
        session = self.server.session
        if session is None or session.node != self.node or session.finished:
            raise WireError(f"the fed server has not opened a session for node {self.node}")
        if self.server.serialize:
            msg = decode(encode(msg))
        size = encoded_size(msg)
        self.bytes_up += size
        session.bytes_up += size
        reply = session.handle(msg)
        size = encoded_size(reply)
        self.bytes_down += size
        session.bytes_down += size
        return decode(encode(reply)) if self.server.serialize else reply

    def __enter__(self) -> "LocalStream":
        return self

    def __exit__(self, *exc) -> None:
        pass


class LocalMainServer:
    """The main server in this process: what the fed server and the clients need of one, without a network.

    Args:
        main: The main server (top part, its adapter and optimizer).
        want: What activations must look like.
        serialize: Encode and decode every stream message (as ``federation.serialize``).
    """

    checkpointable = True

    def __init__(self, main: MainServer, want: Activations, *, serialize: bool = True) -> None:
        self.main = main
        self.cut = main.cut
        self.want = want
        self.serialize = serialize
        self.session: Session | None = None

    def begin(self, rnd: int, node: int, max_steps: int | None = None) -> str:
        """Open the session of (round, node); any other node's stream is refused until `finish`.

        Returns the session's key, which only the client given it (in its ``split_fit_ins``) can present.
        """
        self.session = Session(self.main, self.want, rnd, node, key=secrets.token_hex(16), max_steps=max_steps)
        return self.session.key

    def finish(self, rnd: int, node: int) -> dict[str, Any]:
        """Close the session; returns its report (status, steps, losses, stream bytes)."""
        session, self.session = self.session, None
        assert session is not None and (session.round, session.node) == (rnd, node), "finish without begin"
        return session.close()

    def dial(self, node: int, key: str = "") -> LocalStream:
        if self.session is None:
            raise WireError(f"the fed server has not opened a session for node {node}")
        self.session.admit(node, key)
        return LocalStream(self, node)

    def state(self) -> dict[str, torch.Tensor]:
        return self.main.state()

    def take_compute(self) -> tuple[int, float]:
        return self.main.take_compute()

    def close(self) -> None:
        pass


class LocalServices:
    """Split learning's services in this process: one `LocalMainServer` on the run's own model.

    The fed server asks for it (`main_server`); the simulated clients dial it (`dial`).
    """

    def __init__(self, model, device: torch.device, *, serialize: bool = True) -> None:
        self.model, self.device, self.serialize = model, device, serialize
        self._main: LocalMainServer | None = None

    def main_server(self, cut: Cut, want: Activations, settings: TrainSettings) -> LocalMainServer:
        main = MainServer(self.model, cut, settings, device=self.device, count_flops=settings.count_flops)
        self._main = LocalMainServer(main, want, serialize=self.serialize)
        return self._main

    def dial(self, node: int, key: str = "") -> LocalStream:
        if self._main is None:
            raise WireError(f"node {node} dialled the main server before the fed server started it")
        return self._main.dial(node, key)
