"""Split-FedLLM (SplitFed): the model is cut after block c; clients train the bottom, the main server the top.

Two server roles, as in SplitFed (Thapa et al., 2022): the *fed server* runs the
rounds and averages the clients' bottom adapters; the *main server*
(`fedtune.split_model.MainServer`) holds blocks [c, L), the norm and the LM head,
and trains their adapter on every client's activations.

Round r, as the fed server sees it (`serve`), one sampled client at a time:
  1. send the client the global bottom adapter (``split_fit_ins``); it loads it, runs its
     bottom part on its first batch and replies with the activations at the cut (``split_act``);
  2. each step: the main server runs the top on them, computes the loss, backpropagates and steps its
     optimizer; the fed server sends the gradient at the cut back (``split_grad``), which also asks for
     the next batch's activations; the client backpropagates it, steps, and replies with them. The last
     ``split_grad`` asks for the client's adapter instead (``fit_res``).
     U-shaped: the client keeps the norm, the head and the labels; the server returns its top
     activations (``split_top``) and the client replies with their gradient and the loss
     (``split_top_grad``): one more round trip per step;
  3. FedAvg the valid bottom adapters (weighted by num_examples); evaluate and save the combined
     adapter (global bottom + the main server's top); checkpoint the bottom, the strategy, the top
     adapter and the main server's optimizer (`fedtune.checkpoint`; in-process main server only).

Messages (all Grid messages, so a networked runtime carries them unchanged):

  kind            dir   tensors                                          meta
  split_fit_ins   down  the global bottom adapter (PEFT keys)            round, cut_layer, u_shaped, wire_dtype
  split_act       up    activations (b, s, hidden) in the wire dtype,    round, step, steps, num_examples
                        attention_mask (b, s) bool,
                        labels (b, s) int32 (not when U-shaped)
  split_top       down  top_activations (b, s, hidden)   (U-shaped)      round, step
  split_top_grad  up    top_grad (b, s, hidden)          (U-shaped)      round, step, loss
  split_grad      down  grad (b, s, hidden): gradient at the cut         round, step, last
  fit_res         up    the client's bottom adapter                      num_examples, steps, flops, ...

Over a network (``runtime.split_server`` = host:port of `fedtune split-server`,
`fedtune.runtime.split_service`), only ``split_fit_ins`` (meta also ``split_server``)
and ``fit_res`` (meta also ``stream_bytes_up``/``_down``) cross the Grid: the client
streams its ``split_act``/``split_grad`` steps to the service over gRPC itself
(`train_client_remote`); the fed server opens and closes each session there and
pulls the top adapter from it.

Every server->client message also carries ``dst``. Activations and gradients
travel in ``split.wire_dtype``; the computation runs in the model's dtype.

A client that fails or sends an invalid message ends its round there: its bottom
adapter is not aggregated, so the global bottom state is untouched, while the
main server keeps the steps it already took on that client's valid batches (they
were ordinary training steps; undoing them would need a copy of the top state
and optimizer per client). Bytes are the exact encoded sizes of every message
exchanged, including those of a failed round up to the failure.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import get_peft_model_state_dict

from ..checkpoint import Saved, load_optimizer_state, optimizer_state, rng_state, set_rng_state
from ..context import RunContext
from ..data.tasks import IGNORE, Example, collate
from ..grid import Grid, is_error
from ..meter import ComputeMeter
from ..models import DTYPES, backbone
from ..split_model import CLIENT, SERVER, Cut, MainServer, bottom_forward, compute_dtype, head_loss
from ..strategies import make_strategy
from ..wire import Message, WireError, check, encoded_size, spec_of
from .fedpeft import (ServerHooks, State, TrainSettings, adapter_state, batches, load_adapter_state, make_optimizer,
                      round_rng, screen_reply, settings_from)

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def load_part(model, cut: Cut, side: str, state: State) -> None:
    """Copy one side's adapter state into the model; its key set must be exactly that side's keys."""
    load_adapter_state(model, state, expected=set(cut.part(get_peft_model_state_dict(model), side)),
                       what=f"{side} adapter")


# --------------------------------------------------------------------------- client side


@dataclass
class _Round:
    """What a client keeps between the messages of one round."""

    rnd: int
    steps: int
    batches: Iterator[list[Example]]
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    step: int = 0  # batches sent so far
    seen: int = 0
    cut_out: torch.Tensor | None = None  # activations at the cut, still attached to the bottom's graph
    labels: torch.Tensor | None = None  # U-shaped: the labels stay here
    flops: int = 0
    seconds: float = 0.0
    peak: int = 0
    losses: list[float] = field(default_factory=list)


class SplitClient:
    """One client: its private examples and the bottom part of the shared model.

    In simulation every client and the main server share one `PeftModel`; the
    client owns the adapter of the embeddings and blocks [0, c) (U-shaped: also
    the norm and the head) and loads the global bottom state into it at the start
    of each round. Its compute is metered around its own work only.
    """

    def __init__(self, node_id: int, model, examples: list[Example], settings: TrainSettings, *, cut: Cut,
                 wire_dtype: torch.dtype, device: torch.device, pad_id: int, seed: int,
                 dial: Callable[[str, int], Any] | None = None) -> None:
        if not examples:
            raise ValueError(f"client {node_id} has no training examples")
        self.node_id = node_id
        self.model = model
        self.examples = examples
        self.settings = settings
        self.cut = cut
        self.wire_dtype = wire_dtype
        self.device = device
        self.pad_id = pad_id
        self.seed = seed
        self.dial = dial  # (address, node) -> a stream to the main-server service (runtime.split_service)
        self._round: _Round | None = None

    def __call__(self, msg: Message) -> Message:
        if msg.kind == "split_fit_ins":
            self._start(msg)
            return self._train_remote(msg.meta["split_server"]) if msg.meta.get("split_server") else self._forward()
        r = self._round
        if r is None or msg.meta.get("round") != r.rnd:
            raise ValueError(f"client {self.node_id} got {msg.kind!r} for round {msg.meta.get('round')} "
                             f"outside a round it is training")
        if msg.kind == "split_top" and self.cut.u_shaped:
            return self._head(msg)
        if msg.kind == "split_grad":
            self._backward(msg)
            return self._finish() if msg.meta.get("last") else self._forward()
        raise ValueError(f"client {self.node_id} cannot handle a {msg.kind!r} message")

    def _start(self, msg: Message) -> None:
        """Check the server's split settings, load the global bottom adapter, seed and set up the round."""
        rnd = int(msg.meta["round"])
        mine = {"cut_layer": self.cut.layer, "u_shaped": self.cut.u_shaped, "wire_dtype": DTYPE_NAMES[self.wire_dtype]}
        theirs = {k: msg.meta.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"client {self.node_id} is configured for {mine} but the server uses {theirs}")
        load_part(self.model, self.cut, CLIENT, {k: v.to(self.device) for k, v in msg.tensors.items()})
        params = self.cut.params(self.model, CLIENT)
        steps = self.settings.steps_for(len(self.examples))
        rng, torch_seed = round_rng(self.seed, rnd, self.node_id)
        torch.manual_seed(torch_seed)
        self._round = _Round(rnd, steps, batches(self.examples, self.settings.batch_size, steps, rng),
                             make_optimizer(params, self.settings), params)
        self.model.train()

    def _train_remote(self, address: str) -> Message:
        """Every step of the round against the main-server service at `address`; the reply is ``fit_res``.

        The steps are the in-process ones (``_forward``, ``_head``, ``_backward``), the messages too; only
        the carrier differs. The stream hands each reply over decoded but unchecked: ``_head`` and
        ``_backward`` check it (names, shapes, dtypes, finite values), once per reply as in process.
        The stream's bytes (len of each payload) are reported in ``fit_res`` meta.
        """
        if self.dial is None:
            raise ValueError(f"client {self.node_id} was asked to train against the split server {address} but "
                             "has no way to dial one")
        r = self._round
        with self.dial(address, self.node_id) as stream:
            while r.step < r.steps:
                act = self._forward()
                if self.cut.u_shaped:
                    top = stream.exchange(act)
                    _expect_step(top, "split_top", r)
                    act = self._head(top)  # the norm, head and loss here; the reply is their gradient
                grad = stream.exchange(act)
                _expect_step(grad, "split_grad", r)
                self._backward(grad)  # validates the gradient (shape, dtype, finite) once, as in process
        reply = self._finish()
        reply.meta.update(stream_bytes_up=stream.bytes_up, stream_bytes_down=stream.bytes_down)
        return reply

    def _forward(self) -> Message:
        """Bottom part on the next batch; the reply carries the activations at the cut."""
        r = self._round
        with self._metered():
            chunk = next(r.batches)
            batch = {k: v.to(self.device) for k, v in collate(chunk, self.pad_id).items()}
            r.optimizer.zero_grad(set_to_none=True)
            r.cut_out = bottom_forward(self.model, self.cut.layer, batch["input_ids"], batch["attention_mask"])
            tensors = {"activations": r.cut_out.detach().to(self.wire_dtype),
                       "attention_mask": batch["attention_mask"].bool()}
        r.step += 1
        r.seen += len(chunk)
        if self.cut.u_shaped:
            r.labels = batch["labels"]
        else:
            tensors["labels"] = batch["labels"].to(torch.int32)
        return Message(tensors, {"kind": "split_act", "round": r.rnd, "step": r.step, "steps": r.steps,
                                 "num_examples": len(self.examples)})

    def _head(self, msg: Message) -> Message:
        """U-shaped: norm, head and loss on the server's top activations; reply with their gradient."""
        r = self._round
        check(msg, {"top_activations": (tuple(r.cut_out.shape), self.wire_dtype)})
        with self._metered():
            top = msg.tensors["top_activations"].to(self.device, compute_dtype(self.model)).detach()
            top.requires_grad_(True)
            loss = head_loss(self.model, top, r.labels)
            loss.backward()  # the head's own adapter gradients wait in .grad for this step's optimizer step
            grad = top.grad.to(self.wire_dtype)
        r.losses.append(float(loss.detach()))
        return Message({"top_grad": grad}, {"kind": "split_top_grad", "round": r.rnd, "step": r.step,
                                            "loss": r.losses[-1]})

    def _backward(self, msg: Message) -> None:
        """Backpropagate the gradient at the cut through the bottom part and step."""
        r = self._round
        if r.cut_out is None:
            raise ValueError(f"client {self.node_id} got a gradient but has no activations waiting for one")
        check(msg, {"grad": (tuple(r.cut_out.shape), self.wire_dtype)})
        with self._metered():
            r.cut_out.backward(msg.tensors["grad"].to(self.device, r.cut_out.dtype))
            if self.settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(r.params, self.settings.max_grad_norm)
            r.optimizer.step()
        r.cut_out = None

    def _finish(self) -> Message:
        r = self._round
        self._round = None
        self.model.eval()
        meta: dict[str, Any] = {
            "kind": "fit_res", "round": r.rnd, "num_examples": len(self.examples), "examples_seen": r.seen,
            "steps": r.step, "flops": r.flops, "peak_memory_bytes": r.peak, "seconds": r.seconds,
        }
        return Message(self.cut.part(adapter_state(self.model), CLIENT), meta)

    @contextmanager
    def _metered(self):
        """ComputeMeter around one piece of the client's own work, added to the round's totals."""
        r = self._round
        meter = ComputeMeter(self.device, count_flops=self.settings.count_flops)
        with meter:
            yield
        r.flops += meter.flops or 0
        r.seconds += meter.seconds
        r.peak = max(r.peak, meter.peak_memory_bytes)


def _expect_step(msg: Message, kind: str, r: _Round) -> None:
    """WireError unless a reply from the split service is the `kind` of this round's current step."""
    if msg.kind != kind or msg.meta.get("step") != r.step or msg.meta.get("round") != r.rnd:
        raise WireError(f"expected the {kind} of round {r.rnd} step {r.step}, got a {msg.kind!r} of round "
                        f"{msg.meta.get('round')!r} step {msg.meta.get('step')!r}")


# --------------------------------------------------------------------------- fed server side


@dataclass
class Activations:
    """What the fed server accepts as a client's cut-layer activations."""

    dtype: torch.dtype  # the wire dtype
    hidden_size: int
    vocab_size: int


class _ClientFailed(Exception):
    """The runtime reported the client as failed (it raised, timed out, or its payload could not be decoded)."""


def meta_number(msg: Message, key: str, *, integer: bool = False) -> float:
    """A finite number (positive integer when `integer`) from a received message's meta; WireError otherwise."""
    value = msg.meta.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WireError(f"{msg.kind} meta {key!r} must be a finite number, got {value!r}")
    if integer and (int(value) != value or value < 1):
        raise WireError(f"{msg.kind} meta {key!r} must be a positive integer, got {value!r}")
    return value


def read_activations(msg: Message, step: int, want: Activations, *, with_labels: bool):
    """Validate a ``split_act`` reply; returns (activations, attention_mask, labels or None)."""
    if msg.meta.get("step") != step:
        raise WireError(f"expected the activations of step {step}, got step {msg.meta.get('step')!r}")
    act = msg.tensors.get("activations")
    if act is None or act.dim() != 3 or act.shape[-1] != want.hidden_size or act.numel() == 0:
        shape = None if act is None else tuple(act.shape)
        raise WireError(f"activations must have shape (batch, seq, {want.hidden_size}), got {shape}")
    b, s = act.shape[:2]
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


def _fit_res_check(bottom: State):
    """Validates a client's final reply: its bottom adapter's keys, shapes and values, and num_examples."""
    def validate(reply: Message) -> None:
        check(reply, spec_of(bottom))
        meta_number(reply, "num_examples", integer=True)
    return validate


def train_client(grid: Grid, node: int, rnd: int, bottom: State, main: MainServer, want: Activations,
                 bars=None) -> tuple[dict[str, Any], tuple[State, float] | None]:
    """One client's round of split training, driven by the fed server.

    Returns the client record for ``metrics.jsonl`` and the client's (bottom adapter,
    num_examples), or None when the client failed or sent an invalid message.
    """
    u_shaped = main.cut.u_shaped
    record: dict[str, Any] = {"type": "client", "round": rnd, "client": node}
    down = up = 0
    losses: list[float] = []
    route = {"round": rnd, "dst": node}

    def exchange(msg: Message, kind: str) -> Message:
        nonlocal down, up
        down += encoded_size(msg)
        reply = grid.send_and_receive([msg])[0]
        up += encoded_size(reply)
        if is_error(reply):
            raise _ClientFailed(str(reply.meta.get("error", "")))
        if reply.kind != kind:
            raise WireError(f"expected a {kind!r} reply, got {reply.kind!r}")
        return reply

    update = None
    try:
        reply = exchange(Message(bottom, {"kind": "split_fit_ins", **route, "cut_layer": main.cut.layer,
                                          "u_shaped": u_shaped, "wire_dtype": DTYPE_NAMES[want.dtype]}), "split_act")
        steps = int(meta_number(reply, "steps", integer=True))
        if bars is not None:
            bars.start("steps", steps, info=f"client {node}")
        for step in range(1, steps + 1):
            act, mask, labels = read_activations(reply, step, want, with_labels=not u_shaped)
            if u_shaped:
                top = main.forward(act, mask)
                back = exchange(Message({"top_activations": top}, {"kind": "split_top", **route, "step": step}),
                                "split_top_grad")
                check(back, spec_of({"top_grad": top}))
                loss = meta_number(back, "loss")
                grad = main.backward(back.tensors["top_grad"])
            else:
                grad, loss = main.forward_backward(act, mask, labels)
            losses.append(loss)
            last = step == steps
            reply = exchange(Message({"grad": grad}, {"kind": "split_grad", **route, "step": step, "last": last}),
                             "fit_res" if last else "split_act")
            if bars is not None:
                bars.advance("steps", info=f"client {node} loss {loss:.3f}")
    except _ClientFailed as err:
        record.update(status="failed", error=str(err)[:500])
    except WireError as err:
        record.update(status="rejected", error=str(err)[:500])
    else:
        fields, update = screen_reply(reply, _fit_res_check(bottom))
        record.update(fields)
    finally:
        main.abandon()
    record.update(bytes_down=down, bytes_up=up, server_steps=len(losses))
    if losses:
        record.update(train_loss=sum(losses) / len(losses), train_loss_first=losses[0], train_loss_last=losses[-1])
    return record, update


def train_client_remote(grid: Grid, node: int, rnd: int, bottom: State, main, want: Activations,
                        bars=None) -> tuple[dict[str, Any], tuple[State, float] | None]:
    """One client's round when the main server is a service (`runtime.split_service.RemoteMainServer`).

    The fed server opens the service's session for this client, sends ``split_fit_ins`` (with the
    service's address) through the Grid, gets ``fit_res`` back after the client has streamed its steps
    to the service, and closes the session. The service's own report is trusted over the client's:
    the update counts only when the service saw every announced step. Bytes are the Grid messages'
    encoded sizes plus the stream's, as the service counted them (``len`` of each payload).
    """
    record: dict[str, Any] = {"type": "client", "round": rnd, "client": node}
    msg = Message(bottom, {"kind": "split_fit_ins", "round": rnd, "dst": node, "cut_layer": main.cut.layer,
                           "u_shaped": main.cut.u_shaped, "wire_dtype": DTYPE_NAMES[want.dtype],
                           "split_server": main.address})
    if bars is not None:
        bars.start("steps", 1, info=f"client {node} (split server {main.address})")
    main.begin(rnd, node)
    try:
        reply = grid.send_and_receive([msg])[0]
    finally:
        report = main.finish(rnd, node)
    losses = report["losses"]
    record.update(bytes_down=encoded_size(msg) + report["stream_bytes_down"],
                  bytes_up=encoded_size(reply) + report["stream_bytes_up"], server_steps=report["server_steps"],
                  stream_bytes_up=report["stream_bytes_up"], stream_bytes_down=report["stream_bytes_down"])
    if losses:
        record.update(train_loss=sum(losses) / len(losses), train_loss_first=losses[0], train_loss_last=losses[-1])
    check_fit_res = _fit_res_check(bottom)

    def validate(reply: Message) -> None:
        if report["status"] != "ok":
            raise WireError(f"the split server saw this session end {report['status']}: {report['error']}")
        if reply.kind != "fit_res":
            raise WireError(f"expected a 'fit_res' reply, got {reply.kind!r}")
        check_fit_res(reply)

    fields, update = screen_reply(reply, validate)
    record.update(fields)
    if bars is not None:
        bars.advance("steps")
    return record, update


def serve(
    grid: Grid,
    bottom: State,
    main: MainServer,
    strategy,
    want: Activations,
    *,
    rounds: int,
    clients_per_round: int,
    seed: int,
    eval_every: int,
    hooks: ServerHooks,
    min_replies: int = 1,
) -> tuple[State, list[dict[str, Any]]]:
    """Run the Split-FedLLM round loop; return the final global bottom state and the evaluations.

    Args:
        grid: Where the clients are.
        bottom: The initial global bottom adapter state (also the expected shape of every returned one).
        main: The main server (top part and its optimizer), in process or a service
            (`runtime.split_service.RemoteMainServer`, which has an ``address``).
        strategy: ``aggregate(state, updates) -> state`` for the bottom adapters (FedAvg by default).
        want: The activations' wire dtype, hidden size and vocabulary size, to validate what clients send.
        rounds: Number of rounds.
        clients_per_round: Clients sampled (uniformly, seeded) each round; trained one after another.
        seed: Seed of the client sampling.
        eval_every: Evaluate every N rounds, and after the last.
        hooks: Evaluation and checkpointing of a bottom state combined with the server's top, logging, progress.
        min_replies: Fewer valid client adapters than this keep the previous global bottom state.
    """
    nodes = grid.node_ids()
    train = train_client_remote if getattr(main, "address", None) else train_client
    sampler = random.Random(seed)
    evaluations: list[dict[str, Any]] = []
    done = 0
    saved = hooks.resume("Split-FedLLM")
    if saved is not None:
        check(Message(saved.tensors.get("global", {})), spec_of(bottom))
        bottom = saved.tensors["global"]
        strategy.load_state_dict(saved.tensors.get("strategy", {}))
        restore_main_server(main, saved)
        set_rng_state(sampler, saved.meta["sampler"])
        evaluations, done = saved.meta["evaluations"], saved.round
    hooks.bars.start("rounds", rounds)
    hooks.bars.advance("rounds", by=done)
    for rnd in range(done + 1, rounds + 1):
        chosen = sorted(sampler.sample(nodes, clients_per_round))
        hooks.bars.start("clients", len(chosen), info=f"round {rnd}")
        updates = []
        for node in chosen:
            record, update = train(grid, node, rnd, bottom, main, want, hooks.bars)
            hooks.log(record)
            if update is not None:
                updates.append(update)
            hooks.bars.advance("clients")
        flops, seconds = main.take_compute()
        hooks.log({"type": "server", "round": rnd, "flops": flops, "seconds": seconds})
        aggregated = len(updates) >= min_replies
        if aggregated:
            bottom = strategy.aggregate(bottom, updates)
        hooks.end_round(rnd, rounds, eval_every, bottom, evaluations, len(updates), len(chosen), aggregated)
        if hooks.checkpoint is not None:
            opt_tensors, opt_meta = optimizer_state(main.optimizer)
            hooks.checkpoint.save(rnd, {"global": bottom, "strategy": strategy.state_dict(), "top": main.state(),
                                        "optimizer": opt_tensors},
                                  {"sampler": rng_state(sampler), "evaluations": evaluations, "optimizer": opt_meta})
    return bottom, evaluations


def restore_main_server(main: MainServer, saved: Saved) -> None:
    """Put the checkpointed top adapter and its optimizer's state back into an in-process main server.

    A networked main server (``runtime.split_server``) keeps both in its own process, out of the fed
    server's reach; `checkpoint.enabled` turns checkpoints off for it, so it never gets here.
    """
    assert isinstance(main, MainServer), "only an in-process main server resumes from a checkpoint"
    load_part(main.model, main.cut, SERVER, {k: v.to(main.device) for k, v in saved.tensors["top"].items()})
    load_optimizer_state(main.optimizer, saved.tensors.get("optimizer", {}), saved.meta["optimizer"])


# --------------------------------------------------------------------------- wiring


def make_cut(ctx: RunContext) -> Cut:
    """The cut that ``split.cut_layer`` and ``split.u_shaped`` describe (ValueError when out of range)."""
    return Cut(ctx.model, ctx.config.split.cut_layer, u_shaped=ctx.config.split.u_shaped)


def dial_service(address: str, node: int):
    """A client's stream to the main-server service, credentials from its environment (imported on first use)."""
    from ..runtime.split_service import dial

    return dial(address, node)


def make_clients(ctx: RunContext) -> dict[int, SplitClient]:
    """One split client app per partition (each can also train against a split server, see `dial_service`)."""
    cut, settings = make_cut(ctx), settings_from(ctx)
    wire_dtype = DTYPES[ctx.config.split.wire_dtype]
    return {
        i: SplitClient(i, ctx.model, ctx.client_examples(i), settings, cut=cut, wire_dtype=wire_dtype,
                       device=ctx.device, pad_id=ctx.pad_id, seed=ctx.config.seed, dial=dial_service)
        for i in range(len(ctx.data.parts))
    }


def remote_main_server(ctx: RunContext, cut: Cut):
    """The fed server's handle on the service at ``runtime.split_server`` (credentials from the environment)."""
    from ..runtime.split_service import FED_SERVER, Credentials, RemoteMainServer, SplitServiceError

    c = ctx.config
    main = RemoteMainServer(c.runtime.split_server, Credentials.from_env(FED_SERVER), cut=cut,
                            wire_dtype=DTYPES[c.split.wire_dtype], expect=spec_of(cut.part(adapter_state(ctx.model),
                                                                                          SERVER)))
    try:
        main.state()  # reachable, authenticated, and holding the top adapter this config describes
    except (SplitServiceError, WireError) as err:
        main.close()
        raise ValueError(f"runtime.split_server = {c.runtime.split_server!r}: {err}. Start the service with "
                         f"`fedtune split-server --config <this config> --port <port>` or fix the address.") from None
    return main


def run_server(ctx: RunContext, grid: Grid) -> list[dict[str, Any]]:
    """Fed server and main server of a whole run; leaves the final combined adapter in ``ctx.model`` and on disk."""
    c, f = ctx.config, ctx.config.federation
    cut = make_cut(ctx)
    if c.runtime.split_server:
        main = remote_main_server(ctx, cut)
    else:
        main = MainServer(ctx.model, cut, settings_from(ctx), device=ctx.device, count_flops=c.train.count_flops)
    body = backbone(ctx.model).config
    want = Activations(DTYPES[c.split.wire_dtype], body.hidden_size, body.vocab_size)

    def combine(bottom: State) -> None:
        # Unsplit inference through the combined adapter equals split inference.
        load_adapter_state(ctx.model, {**bottom, **main.state()})

    hooks = ServerHooks.for_model(ctx, load=combine)
    try:
        final, evaluations = serve(
            grid, cut.part(adapter_state(ctx.model), CLIENT), main, make_strategy(f.strategy, f.server_lr,
                                                                                  f.server_momentum), want,
            rounds=f.rounds, clients_per_round=f.clients_per_round, seed=c.seed, eval_every=c.eval.every,
            hooks=hooks, min_replies=f.min_replies,
        )
        combine(final)
    finally:
        if not isinstance(main, MainServer):
            main.close()  # the service's channel
    return evaluations
