"""Split-FedLLM (SplitFed): the model is cut after block c; clients train the bottom, the main server the top.

Two server roles, as in SplitFed (Thapa et al., 2022): the *fed server* runs the rounds and averages
the clients' bottom adapters; the *main server* (`fedtune.split_model.MainServer`) holds blocks
[c, L), the norm and the LM head, and trains their adapter on every client's activations.

Round r, as the fed server sees it (`serve`), one sampled client at a time:
  1. open the main server's session for the client and send it the global bottom adapter
     (``split_fit_ins``) through the Grid;
  2. the client loads it and streams its steps to the main server (`fedtune.split_session`): each step
     its bottom part's activations at the cut go up, the main server runs the top, the loss, the
     backward and its optimizer step, and the gradient at the cut comes down; the client backpropagates
     it and steps (U-shaped: the client keeps the norm, the head and the labels; one more round trip a
     step). Then it replies ``fit_res`` with its bottom adapter;
  3. close the session, whose report (status, steps, losses, stream bytes) the fed server trusts over
     the client's; FedAvg the valid bottom adapters (weighted by num_examples); evaluate and save the
     combined adapter (global bottom + the main server's top); checkpoint (in-process main server only).

Where the main server lives is not this module's business: ``ctx.services`` hands the fed server its main server
and the clients their stream to it, in process (`split_session.LocalServices`) or over gRPC (`RemoteServices`).

Messages:
  kind            dir           tensors                                          meta
  split_fit_ins   Grid, down    the global bottom adapter (PEFT keys)            round, cut_layer, u_shaped, wire_dtype
  split_act       stream, up    activations (b, s, hidden) in the wire dtype,    round, step, steps, num_examples
                                attention_mask (b, s) bool,
                                labels (b, s) int32 (not when U-shaped)
  split_top       stream, down  top_activations (b, s, hidden)   (U-shaped)      round, step
  split_top_grad  stream, up    top_grad (b, s, hidden)          (U-shaped)      round, step, loss
  split_grad      stream, down  grad (b, s, hidden): gradient at the cut         round, step, last, loss
  fit_res         Grid, up      the client's bottom adapter                      num_examples, steps, flops, ...

Activations and gradients travel in ``split.wire_dtype``; the computation runs in the model's dtype. A client
that fails or sends an invalid message ends its round there: its bottom adapter is not aggregated, while the main
server keeps the steps it already took on that client's valid batches. Bytes: the Grid messages plus the stream's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..checkpoint import load_optimizer_state, optimizer_state
from ..data.tasks import IGNORE, Example, collate
from ..grid import ClientApp, Grid
from ..flops import FlopCache
from ..meter import ComputeMeter
from ..models import DTYPES, backbone
from ..rounds import RoundLoop, ServerHooks, aggregate, screen_reply, update_norm
from ..split_model import CLIENT, SERVER, Cut, bottom_forward, compute_dtype, head_loss, static_bottom
from ..split_session import Activations, meta_number
from ..strategies import aggregator_of, make_strategy
from ..train.adapter import State, adapter_params, adapter_state, load_adapter_state
from ..train.graphed import GraphedFn, fast_path, flop_counts, pad_width, padded_width, shared, to_device
from ..train.local_steps import TrainSettings, batches, clip_and_step, make_optimizer, round_rng, settings_from
from ..wire import Message, WireError, check, encoded_size, spec_of
from ..peft_methods import INJECTED, PROMPT_LEARNING
from ..registry import Paradigm, register

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class SplitConfig:
    cut_layer: int | None = None
    """Clients hold the embeddings and blocks [0, c); the server blocks [c, L), the norm and the head (default L // 2)."""
    u_shaped: bool = False
    """Keep the head and the labels on the client: the server returns its top activations and receives their gradients."""
    wire_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the activations and gradients on the wire."""

    def __post_init__(self) -> None:
        if self.cut_layer is not None and self.cut_layer < 1:
            raise ValueError(f"split.cut_layer = {self.cut_layer!r} is not allowed: an integer with 1 <= cut_layer "
                             "< number of layers.")


def load_part(model, cut: Cut, side: str, state: State) -> None:
    """Copy one side's adapter state into the model; its key set must be exactly that side's keys."""
    load_adapter_state(model, state, expected=set(cut.part(adapter_params(model), side)),
                       what=f"{side} adapter")


# --------------------------------------------------------------------------- client side


@dataclass
class _Round:
    """What a client keeps between the steps of one round."""

    rnd: int
    steps: int
    batches: Iterator[list[Example]]
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    step: int = 0  # batches sent so far
    seen: int = 0
    cut_out: torch.Tensor | None = None  # activations at the cut, still attached to the bottom's graph
    wire_shape: tuple[int, ...] = ()  # the activations' shape as they travel (the fast path pads cut_out)
    labels: torch.Tensor | None = None  # U-shaped: the labels stay here
    flops: int = 0
    seconds: float = 0.0
    peak: int = 0
    losses: list[float] = field(default_factory=list)


class SplitClient(ClientApp):
    """One client: its private examples and the bottom part of the shared model.

    In simulation every client and the main server share one `PeftModel`; the client owns the adapter
    of the embeddings and blocks [0, c) (U-shaped: also the norm and the head) and loads the global
    bottom state into it at the start of each round. Its compute is metered around its own work only.
    ``dial(node, session_key)`` opens its stream to the main server (``ctx.services.dial``).
    """

    def __init__(self, node_id: int, model, examples: list[Example], settings: TrainSettings, *, cut: Cut,
                 wire_dtype: torch.dtype, device: torch.device, pad_id: int, seed: int,
                 dial: Callable[[int, str], Any]) -> None:
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
        self.dial = dial
        self.flops = FlopCache(settings.count_flops)  # counted once per (part, batch shape), then reused
        # The fast path (standard split): the bottom's forward and backward as per-shape CUDA graphs, shared by
        # the clients of this model (and so is each shape's FLOP count).
        static, graphs = fast_path(settings, device)
        self.bottom = None
        if static and not cut.u_shaped:
            self.bottom = shared(model, ("split bottom", cut.layer, graphs), lambda: GraphedFn(
                static_bottom(model, cut.layer), cut.params(model, CLIENT), graphs=graphs, model=model,
                name="split client step"))
            self.flops.per_key = flop_counts(model)
        self._round: _Round | None = None

    def __call__(self, msg: Message) -> Message:
        """A whole round: ``split_fit_ins`` in, every step streamed to the main server, ``fit_res`` out."""
        if msg.kind != "split_fit_ins":
            raise ValueError(f"client {self.node_id} cannot handle a {msg.kind!r} message")
        self._start(msg)
        r = self._round
        with self.dial(self.node_id, str(msg.meta.get("session_key", ""))) as stream:
            while r.step < r.steps:
                act = self._forward()
                if self.cut.u_shaped:
                    top = stream.exchange(act)
                    _expect_step(top, "split_top", r)
                    act = self._head(top)  # the norm, head and loss here; the reply is their gradient
                grad = stream.exchange(act)
                _expect_step(grad, "split_grad", r)
                self._backward(grad)  # validates the gradient (shape, dtype, finite) once
        reply = self._finish()
        reply.meta.update(stream_bytes_up=stream.bytes_up, stream_bytes_down=stream.bytes_down)
        return reply

    def _start(self, msg: Message) -> None:
        """Check the server's split settings, load the global bottom adapter, seed and set up the round."""
        rnd = int(meta_number(msg, "round", integer=True))
        mine = {"cut_layer": self.cut.layer, "u_shaped": self.cut.u_shaped, "wire_dtype": DTYPE_NAMES[self.wire_dtype]}
        theirs = {k: msg.meta.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"client {self.node_id} is configured for {mine} but the server uses {theirs}")
        load_part(self.model, self.cut, CLIENT, {k: v.to(self.device) for k, v in msg.tensors.items()})
        params = self.cut.params(self.model, CLIENT)
        steps = self.settings.steps_for(len(self.examples))
        rng, torch_seed = round_rng(self.seed, rnd, self.node_id)
        torch.manual_seed(torch_seed)
        self.flops.take()
        self._round = _Round(rnd, steps, batches(self.examples, self.settings.batch_size, steps, rng),
                             make_optimizer(params, self.settings), params)
        self.model.train()

    def _forward(self) -> Message:
        """Bottom part on the next batch; the message carries the activations at the cut."""
        r = self._round
        chunk = next(r.batches)
        if self.bottom is not None:  # the fast path: right-padded and graphed; the real width travels
            batch = collate(chunk, self.pad_id)
            width = batch["input_ids"].shape[1]
            ids = to_device(pad_width(batch["input_ids"], padded_width(width), 0), self.device)
            batch = {k: to_device(batch[k], self.device) for k in ("attention_mask", "labels")}
            with self._metered(("bottom forward", *ids.shape)):
                r.optimizer.zero_grad(set_to_none=True)
                r.cut_out = self.bottom(ids)
                act = r.cut_out.detach()[:, :width].to(self.wire_dtype, copy=True)
        else:
            batch = {k: v.to(self.device) for k, v in collate(chunk, self.pad_id).items()}
            with self._metered(("bottom forward", *batch["input_ids"].shape)):
                r.optimizer.zero_grad(set_to_none=True)
                r.cut_out = bottom_forward(self.model, self.cut.layer, batch["input_ids"], batch["attention_mask"])
                act = r.cut_out.detach().to(self.wire_dtype)
        r.wire_shape = tuple(act.shape)
        tensors = {"activations": act, "attention_mask": batch["attention_mask"].bool()}
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
        check(msg, {"top_activations": (r.wire_shape, self.wire_dtype)})
        with self._metered(("head", *r.labels.shape, int((r.labels[:, 1:] != IGNORE).sum()))):
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
        check(msg, {"grad": (r.wire_shape, self.wire_dtype)})
        with self._metered(("bottom backward", *r.cut_out.shape[:2])):
            grad = msg.tensors["grad"].to(self.device, r.cut_out.dtype)
            r.cut_out.backward(pad_width(grad, r.cut_out.shape[1], 0))  # the fast path: zeros at the padding
            clip_and_step(r.params, r.optimizer, self.settings.max_grad_norm)
        r.cut_out = None

    def _finish(self) -> Message:
        r = self._round
        self._round = None
        self.model.eval()
        meta: dict[str, Any] = {
            "kind": "fit_res", "round": r.rnd, "num_examples": len(self.examples), "examples_seen": r.seen,
            "steps": r.step, "flops": r.flops if self.settings.count_flops else None, "peak_memory_bytes": r.peak,
            "seconds": r.seconds,
        }
        return Message(self.cut.part(adapter_state(self.model), CLIENT), meta)

    @contextmanager
    def _metered(self, key: tuple):
        """Time and memory of one piece of the client's own work, and its FLOPs (counted once per `key`)."""
        r = self._round
        meter = ComputeMeter(self.device, count_flops=False)
        with meter, self.flops.block(key):
            yield
        r.flops = self.flops.total or 0
        r.seconds += meter.seconds
        r.peak = max(r.peak, meter.peak_memory_bytes)


def _expect_step(msg: Message, kind: str, r: _Round) -> None:
    """WireError unless a reply from the main server is the `kind` of this round's current step."""
    if msg.kind != kind or msg.meta.get("step") != r.step or msg.meta.get("round") != r.rnd:
        raise WireError(f"expected the {kind} of round {r.rnd} step {r.step}, got a {msg.kind!r} of round "
                        f"{msg.meta.get('round')!r} step {msg.meta.get('step')!r}")


# --------------------------------------------------------------------------- fed server side


def train_client(grid: Grid, node: int, rnd: int, bottom: State, main, want: Activations,
                 bars=None, max_steps: int | None = None) -> tuple[dict[str, Any], tuple[State, float] | None]:
    """One client's round: open its session on the main server, send ``split_fit_ins``, close the session.

    Returns the client record for ``metrics.jsonl`` and the client's (bottom adapter, num_examples),
    or None when the client failed or sent an invalid message. The main server's own report is
    trusted over the client's: the update counts only when the main server saw every announced step.
    """
    record: dict[str, Any] = {"type": "client", "round": rnd, "client": node}
    if bars is not None:
        bars.start("steps", 1, info=f"client {node}")
    # The session's key travels to the client through the Grid (Flower's TLS), never to the service's port.
    key = main.begin(rnd, node, max_steps=max_steps)
    msg = Message(bottom, {"kind": "split_fit_ins", "round": rnd, "dst": node, "cut_layer": main.cut.layer,
                           "u_shaped": main.cut.u_shaped, "wire_dtype": DTYPE_NAMES[want.dtype], "session_key": key})
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

    def validate(reply: Message) -> None:
        if report["status"] != "ok":
            raise WireError(f"the main server saw this session end {report['status']}: {report['error']}")
        if reply.kind != "fit_res":
            raise WireError(f"expected a 'fit_res' reply, got {reply.kind!r}")
        check(reply, spec_of(bottom))
        meta_number(reply, "num_examples", integer=True)

    fields, update = screen_reply(reply, validate)
    if fields["status"] == "failed" and report["status"] == "rejected":
        # The client gave up on the main server's refusal: say why the main server refused.
        fields = {"status": "rejected", "error": report["error"]}
    record.update(fields)
    if bars is not None:
        bars.advance("steps")
    return record, update


def serve(grid: Grid, bottom: State, main, strategy, want: Activations, *, rounds: int, clients_per_round: int,
          seed: int, eval_every: int, hooks: ServerHooks, min_replies: int = 1,
          max_steps: int | None = None) -> tuple[State, list[dict[str, Any]]]:
    """Run the Split-FedLLM round loop; return the final global bottom state and the evaluations.

    Args:
        grid: Where the clients are.
        bottom: The initial global bottom adapter state (also the expected shape of every returned one).
        main: The main server handle (``begin``, ``finish``, ``state``, ``take_compute``), from ``ctx.services``.
        strategy: ``aggregate(state, updates) -> state`` for the bottom adapters (FedAvg by default).
        want: The activations' wire dtype, hidden size and vocabulary size.
        rounds: Number of rounds.
        clients_per_round: Clients sampled (uniformly, seeded) each round; trained one after another.
        seed: Seed of the client sampling.
        eval_every: Evaluate every N rounds, and after the last.
        hooks: Evaluation and checkpointing of a bottom state combined with the server's top, logging, progress.
        min_replies: Fewer valid client adapters than this keep the previous global bottom state.
        max_steps: Most steps the main server lets a client take a round (`round_steps`); None: unbounded.
    """
    loop = RoundLoop(hooks, "Split-FedLLM", nodes=grid.node_ids(), rounds=rounds, clients_per_round=clients_per_round,
                     seed=seed, eval_every=eval_every)
    saved = loop.resume({"global": spec_of(bottom)}, device=next(iter(bottom.values())).device)
    if saved is not None:
        bottom = saved.tensors["global"]
        strategy.load_state_dict(saved.tensors.get("strategy", {}))
        load_part(main.main.model, main.cut, SERVER, saved.tensors["top"])
        load_optimizer_state(main.main.optimizer, saved.tensors.get("optimizer", {}), saved.meta["optimizer"])

    def checkpoint():
        opt_tensors, opt_meta = optimizer_state(main.main.optimizer)
        return ({"global": bottom, "strategy": strategy.state_dict(), "top": main.state(), "optimizer": opt_tensors},
                {"optimizer": opt_meta})

    for rnd, chosen in loop:
        updates = []
        for node in chosen:
            record, update = train_client(grid, node, rnd, bottom, main, want, hooks.bars, max_steps=max_steps)
            hooks.log({**record, **update_norm(update, bottom)})
            if update is not None:
                updates.append(update)
            hooks.bars.advance("clients")
        flops, seconds = main.take_compute()
        hooks.log({"type": "server", "round": rnd, "flops": flops, "seconds": seconds})
        bottom, aggregated, note = aggregate(strategy, bottom, updates, min_replies=min_replies, privacy=hooks.privacy)
        loop.end(rnd, bottom, replies=len(updates), sampled=len(chosen), aggregated=aggregated, note=note,
                 checkpoint=checkpoint)
    return bottom, loop.evaluations


# --------------------------------------------------------------------------- wiring


def make_cut(ctx) -> Cut:
    """The cut that ``split.cut_layer`` and ``split.u_shaped`` describe (ValueError when out of range)."""
    return Cut(ctx.model, ctx.config.split.cut_layer, u_shaped=ctx.config.split.u_shaped)


def activations_of(ctx) -> Activations:
    """What the main server accepts: the wire dtype, the model's sizes, and the config's batch and length bounds."""
    body = backbone(ctx.model).config
    c = ctx.config
    return Activations(DTYPES[c.split.wire_dtype], body.hidden_size, body.vocab_size,
                       max_batch=c.train.batch_size, max_length=c.data.max_length)


def round_steps(config, parts: list[list[int]] | None) -> int | None:
    """Most steps a client takes a round: ``train.local_steps``, or with ``local_epochs`` the steps of the
    largest partition (None when the partitions are not known here)."""
    s = settings_from(config)
    if s.local_steps is not None:
        return s.local_steps
    return s.steps_for(max(map(len, parts))) if parts else None


def make_clients(ctx) -> dict[int, SplitClient]:
    """One split client app per partition, each dialling the main server through ``ctx.services``."""
    cut, settings = make_cut(ctx), settings_from(ctx.config)
    wire_dtype = DTYPES[ctx.config.split.wire_dtype]
    return {
        i: SplitClient(i, ctx.model, ctx.client_examples(i), settings, cut=cut, wire_dtype=wire_dtype,
                       device=ctx.device, pad_id=ctx.pad_id, seed=ctx.config.seed, dial=ctx.services.dial)
        for i in range(len(ctx.data.parts))
    }


def run_server(ctx, grid: Grid) -> list[dict[str, Any]]:
    """Fed server and main server of a whole run; leaves the final combined adapter in ``ctx.model`` and on disk."""
    c, f = ctx.config, ctx.config.federation
    cut, want = make_cut(ctx), activations_of(ctx)
    main = ctx.services.main_server(cut, want, settings_from(c))

    def combine(bottom: State) -> None:
        # Unsplit inference through the combined adapter equals split inference.
        load_adapter_state(ctx.model, {**bottom, **main.state()})

    try:
        final, evaluations = serve(
            grid, cut.part(adapter_state(ctx.model), CLIENT), main,
            make_strategy(f.strategy, f.server_lr, f.server_momentum, aggregator_of(f)), want, rounds=f.rounds,
            clients_per_round=f.clients_per_round, seed=c.seed, eval_every=c.eval.every,
            hooks=ServerHooks.for_model(ctx, load=combine), min_replies=f.min_replies,
            max_steps=round_steps(c, getattr(ctx.data, "parts", None)),
        )
        combine(final)
    finally:
        main.close()
    return evaluations


def _needs(config, runtime: str) -> str | None:
    if runtime == "flower" and not config.runtime.split_server:
        return ("federation.paradigm = 'split' runs on Flower only with runtime.split_server set: split learning "
                "exchanges a message per training step, which Flower's round trip (seconds) cannot carry. Start the "
                "main-server service (`fedtune split-server --config <this config> --port <port>`) and set "
                "runtime.split_server = host:port in the config.")
    if runtime == "distributed":
        return (f"federation.paradigm = 'split' cannot run with runtime.world_size = {config.runtime.world_size}: "
                "split learning exchanges activations every step, one client at a time, with one main server. Use "
                "runtime.world_size=1.")
    return None


def _validate(config) -> None:
    if config.peft.method in PROMPT_LEARNING:
        raise ValueError(f"peft.method = {config.peft.method!r} does not run under federation.paradigm = 'split': "
                         "virtual tokens act in the whole model's forward (prefix tuning in every layer, on both sides "
                         f"of the cut). Use an injected method ({', '.join(INJECTED)}).")


register(Paradigm(
    "split", "Split-FedLLM", "the model cut at split.cut_layer: clients train the bottom, the main server the top, "
    "activations and gradients every step", make_clients, run_server, section=("split", SplitConfig),
    # The top adapter and its optimizer live in the service's process when the main server is networked.
    checkpoints=lambda config: config.runtime.checkpoint and not config.runtime.split_server, averages_updates=True,
    strategy_label="fedavg (client part)", long_exchanges=True, needs=_needs, validate=_validate,
))
