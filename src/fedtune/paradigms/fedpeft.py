"""FedLLM: federated PEFT (LoRA) with FedAvg and friends, FedProx, and the centralized baseline.

Round r, as the server sees it (`serve`):
  1. sample ``clients_per_round`` clients and send each the global adapter state;
  2. each client loads it, trains ``local_steps`` steps on its own data, and
     replies with its adapter state and ``num_examples`` (`FedPeftClient`);
  3. validate every reply (keys, shapes, dtypes, finite values), drop the bad
     ones, aggregate the rest with the strategy, and evaluate every k rounds.

Bytes are the exact encoded sizes of the messages; client compute is measured
by the client around its real training steps and reported in its reply.
"""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from ..checkpoint import Checkpoint, Saved, rng_state, set_rng_state
from ..checkpoint import enabled as checkpointing
from ..context import RunContext
from ..data.tasks import Example
from ..grid import Grid, is_error
from ..meter import ComputeMeter
from ..progress import Bars
from ..strategies import make_strategy, packed
from ..train_step import StepRunner
from ..wire import Message, WireError, check, encoded_size, spec_of

State = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- client side


_ADAPTER_PARAMS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.nn.Parameter] | None]" = (
    weakref.WeakKeyDictionary())


def adapter_params(model) -> dict[str, torch.nn.Parameter] | None:
    """PEFT state-dict key -> the parameter that holds it, found once per model.

    ``get_peft_model_state_dict`` walks the whole model's state dict (~100 ms a call on the 135M model
    on a CPU core), which would cost more than a client's training steps on a GPU. None when some
    adapter entry is not a parameter of the model (then the PEFT functions are used).
    """
    if model in _ADAPTER_PARAMS:
        return _ADAPTER_PARAMS[model]
    by_address = {p.data_ptr(): p for p in model.parameters() if p.numel()}
    state = get_peft_model_state_dict(model)
    found = {k: by_address.get(v.data_ptr()) for k, v in state.items()}
    params = None if any(p is None or p.shape != state[k].shape for k, p in found.items()) else found
    _ADAPTER_PARAMS[model] = params
    return params


def cpu_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of device tensors in one transfer (one synchronisation instead of one per tensor)."""
    if not tensors or tensors[0].device.type == "cpu" or len({t.dtype for t in tensors}) != 1:
        return [t.detach().to("cpu", copy=True) for t in tensors]
    # Views of the one CPU buffer: no per-tensor copies (wire.encode copies views that share storage).
    return _unflatten(torch.cat([t.detach().reshape(-1) for t in tensors]).cpu(), tensors)


def _unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `flat` shaped like each tensor of `like`, in order (the inverse of concatenating them)."""
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in like]), like)]


_ON_DEVICE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _on_device(model, src: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """`src` on the device in one host-to-device transfer, reusing the last transfer for `model`.

    Every client of a round loads the same global state; in simulation those are the same tensor
    objects, so one transfer serves the whole round. Tensors are matched by identity and version
    counter (an in-place change of a tensor invalidates the copy).
    """
    key = [(t, t._version) for t in src]
    last = _ON_DEVICE.get(model)
    if last is not None and len(last[0]) == len(key) and all(
            a is b and va == vb for (a, va), (b, vb) in zip(last[0], key)) and last[1].device == device:
        flat = last[1]
    else:
        whole = packed(src)  # the state is one buffer already (an aggregate): no concatenation on the host
        flat = (whole if whole is not None else torch.cat([t.reshape(-1) for t in src])).to(device, dtype)
        _ON_DEVICE[model] = (key, flat)
    return _unflatten(flat, src)


def adapter_state(model) -> State:
    """A detached CPU copy of the model's trainable adapter state (PEFT key names).

    On the CPU, not the GPU: a simulation keeps every reply of a round (and the global state) until it
    aggregates, and with hundreds of clients those copies would otherwise cost more GPU memory than training.
    """
    params = adapter_params(model)
    if params is None:
        return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
    return dict(zip(params, cpu_copies(list(params.values()))))


def pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a CUDA tensor in pinned memory, queued on the stream (valid once the stream reaches it)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def adapter_snapshot(model) -> tuple[State, Callable[[], None]]:
    """Like `adapter_state`, without waiting for the device: returns the state and a function to call first.

    On a GPU the parameters are copied into one pinned host buffer asynchronously, in stream order, so
    later work (the next client loading its own adapter into the same parameters) may be queued at once;
    the returned tensors hold the values only after the returned function has waited for the copy.
    Elsewhere this is `adapter_state` and the function does nothing.
    """
    params = adapter_params(model)
    tensors = list(params.values()) if params is not None else []
    if not tensors or tensors[0].device.type != "cuda" or len({t.dtype for t in tensors}) != 1:
        return adapter_state(model), lambda: None
    flat = pinned_copy(torch.cat([t.detach().reshape(-1) for t in tensors]))
    copied = torch.cuda.Event()  # also covers every copy queued before this call (stream order)
    copied.record()
    return dict(zip(params, _unflatten(flat, tensors))), copied.synchronize


def load_adapter_state(model, state: State, expected: set[str] | None = None, what: str = "adapter") -> None:
    """Copy `state` into the model's adapter; missing or unexpected keys are errors, never skipped.

    ``expected`` narrows the keys `state` must have to part of the adapter (split learning loads one side).
    The copy is in place, so the parameters keep their addresses (optimizers and CUDA graphs stay valid).
    """
    params = adapter_params(model)
    if expected is None:
        expected = set(params) if params is not None else set(get_peft_model_state_dict(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise WireError(f"{what} state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    if params is None:
        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise WireError(f"adapter state has keys the model lacks: {unexpected[:3]}")
        return
    keys = sorted(state)
    for k in keys:
        if tuple(state[k].shape) != tuple(params[k].shape):
            raise WireError(f"{what} state {k!r} has shape {tuple(state[k].shape)}, the model's is "
                            f"{tuple(params[k].shape)}")
    dst = [params[k] for k in keys]
    src = [state[k] for k in keys]
    device = dst[0].device
    if device.type != "cpu" and src[0].device.type == "cpu" and len({t.dtype for t in src}) == 1:
        src = _on_device(model, src, device, dst[0].dtype)
    with torch.no_grad():
        torch._foreach_copy_(dst, [t.to(p.device, p.dtype) for p, t in zip(dst, src)])


@dataclass
class TrainSettings:
    """What a client needs to know to train locally (plain values, no config object)."""

    local_steps: int | None
    local_epochs: float | None
    batch_size: int
    lr: float
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    prox_mu: float = 0.0
    count_flops: bool = True
    cuda_graphs: bool = True
    compile: bool = False

    def steps_for(self, num_examples: int) -> int:
        if self.local_steps is not None:
            return self.local_steps
        return max(1, math.ceil(self.local_epochs * num_examples / self.batch_size))


def make_optimizer(params: list[torch.Tensor], s: TrainSettings, capturable: bool = False) -> torch.optim.Optimizer:
    """The client optimizer; ``capturable`` keeps its state on the device so a CUDA graph can replay its step."""
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, weight_decay=s.weight_decay)
    if capturable:
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, capturable=True, foreach=True)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def make_runner(model, s: TrainSettings, *, device: torch.device, pad_id: int) -> StepRunner:
    """The step runner clients of one shared model use (CUDA graphs on CUDA unless turned off)."""
    return StepRunner(model, lambda params, capturable: make_optimizer(params, s, capturable),
                      max_grad_norm=s.max_grad_norm, prox_mu=s.prox_mu, device=device, pad_id=pad_id,
                      graphs=s.cuda_graphs and torch.device(device).type == "cuda", count_flops=s.count_flops,
                      compile=s.compile and torch.device(device).type == "cuda")


def batches(examples: list[Example], batch_size: int, steps: int, rng: random.Random):
    """`steps` batches drawn by walking shuffled epochs of `examples` (a short last batch is skipped)."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, len(examples)):
            order = list(range(len(examples)))
            rng.shuffle(order)
        take, order = order[:batch_size], order[batch_size:]
        yield [examples[i] for i in take]


def round_rng(seed: int, rnd: int, node: int) -> tuple[random.Random, int]:
    """A client's batch-order generator for one round, and the torch seed it trains under (dropout).

    Seeded by (run seed, round, client) so results do not depend on the order clients run in;
    the batched runtime (`fedtune.multilora`) draws the very same batches from it.
    """
    rng = random.Random(hash((seed, rnd, node)) & 0xFFFFFFFF)
    return rng, rng.getrandbits(62)


class FedPeftClient:
    """One client: its private examples and the shared model it trains on.

    In simulation every client shares one `PeftModel` (one frozen base in memory);
    only the adapter values are swapped in, so the model holds nothing between calls
    that the next client could see.
    """

    def __init__(
        self,
        node_id: int,
        model,
        examples: list[Example],
        settings: TrainSettings,
        *,
        device: torch.device,
        pad_id: int,
        seed: int,
        bars: Bars | None = None,
        persistent_optimizer: bool = False,
        runner: StepRunner | None = None,
    ) -> None:
        if not examples:
            raise ValueError(f"client {node_id} has no training examples")
        self.node_id = node_id
        self.model = model
        self.examples = examples
        self.settings = settings
        self.device = device
        self.pad_id = pad_id
        self.seed = seed
        self.bars = bars or Bars(quiet=True)
        self.persistent_optimizer = persistent_optimizer
        self.runner = runner or make_runner(model, settings, device=device, pad_id=pad_id)
        self._trained = False

    def __call__(self, msg: Message) -> Message:
        return self.start(msg)()

    def start(self, msg: Message) -> Callable[[], Message]:
        """Queue this client's round; return the function that waits for it and gives the reply.

        With CUDA graphs nothing here waits for the GPU (the steps, the losses and the copy of the
        adapter are queued in stream order), so a runtime can queue the next client's round before
        taking this one's reply (`fedtune.runtime.local.LocalGrid`): the GPU never idles while the
        host screens replies or prepares batches. Elsewhere the work is done when this returns.
        """
        rnd = int(msg.meta["round"])
        load_adapter_state(self.model, msg.tensors)
        runner = self.runner
        runner.reset(keep_optimizer=self.persistent_optimizer and self._trained)
        self._trained = True
        steps = self.settings.steps_for(len(self.examples))
        # Seeded by (run seed, round, client) so results do not depend on the order clients run in.
        rng, torch_seed = round_rng(self.seed, rnd, self.node_id)
        torch.manual_seed(torch_seed)
        seen = 0
        self.bars.start("steps", steps, info=f"client {self.node_id}")
        if not self.model.training:  # train() walks every module (~25 ms on the 135M model): only when needed
            self.model.train()
        # With CUDA graphs the runner counts FLOPs itself (once per batch shape); counting every
        # replayed step under FlopCounterMode is impossible (nothing is dispatched) and would be slow.
        # It also times the client on the GPU (CUDA events) instead of waiting for it.
        meter = ComputeMeter(self.device, count_flops=self.settings.count_flops and not runner.graphs,
                             sync=not runner.graphs)
        with meter:
            for chunk in batches(self.examples, self.settings.batch_size, steps, rng):
                runner.step(chunk)
                seen += len(chunk)
                # Showing the loss would synchronise with the GPU every step: only on the CPU.
                self.bars.advance("steps", info=None if runner.graphs else
                                  f"client {self.node_id} loss {runner.last_loss():.3f}")
        losses = runner.loss_tensor()
        if losses.is_cuda:
            # Read on the host only after `wait`: a blocking copy later would wait for the next client too.
            losses = pinned_copy(losses)
        flops = (runner.flops if runner.graphs else meter.flops) if self.settings.count_flops else None
        state, wait = adapter_snapshot(self.model)  # waiting for it also covers the losses, queued first

        def reply() -> Message:
            wait()
            values = losses.tolist()
            return Message(state, {
                "kind": "fit_res",
                "round": rnd,
                "src": self.node_id,
                "num_examples": len(self.examples),
                "examples_seen": seen,
                "steps": len(values),
                "train_loss": sum(values) / len(values),
                "train_loss_first": values[0],
                "train_loss_last": values[-1],
                "flops": flops,
                "peak_memory_bytes": meter.peak_memory_bytes,
                "seconds": meter.seconds,
            })

        return reply


# --------------------------------------------------------------------------- server side


@dataclass
class ServerHooks:
    """What the round loop needs from the experiment around it, as plain callables."""

    evaluate: Callable[[State], float]
    log: Callable[[dict[str, Any]], None]
    save: Callable[[State, int], None]
    bars: Bars
    checkpoint: Checkpoint | None = None
    """Where the round loop saves its state after every round and resumes from (``runtime.checkpoint``)."""

    @classmethod
    def for_model(cls, ctx: RunContext, load: Callable[[State], None] | None = None) -> "ServerHooks":
        """Hooks that evaluate and save a global state by loading it into ``ctx.model`` first.

        ``load`` defaults to `load_adapter_state`; split learning passes one that adds the server's part.
        """
        put = load or (lambda state: load_adapter_state(ctx.model, state))

        def evaluate(state: State) -> float:
            put(state)
            return ctx.score()

        def save(state: State, rnd: int) -> None:
            put(state)
            ctx.save_adapter()

        checkpoint = Checkpoint(ctx.path, ctx.config) if checkpointing(ctx.config) else None
        return cls(evaluate=evaluate, log=ctx.log, save=save, bars=ctx.bars, checkpoint=checkpoint)

    def resume(self, what: str) -> Saved | None:
        """The checkpoint to continue from, if any (announced on the console)."""
        saved = self.checkpoint.load() if self.checkpoint is not None else None
        if saved is not None:
            self.bars.print(f"{what}: resuming from the checkpoint after round {saved.round}")
        return saved

    def end_round(self, rnd: int, rounds: int, eval_every: int, state: State, evaluations: list[dict[str, Any]],
                  replies: int, sampled: int, aggregated: bool) -> None:
        """Log the round, evaluate (every `eval_every` rounds and after the last), checkpoint, move the bar."""
        self.log({"type": "round", "round": rnd, "replies": replies, "failed": sampled - replies,
                  "aggregated": aggregated})
        if rnd % eval_every == 0 or rnd == rounds:
            score = self.evaluate(state)
            evaluations.append({"round": rnd, "accuracy": score})
            self.log({"type": "eval", "round": rnd, "accuracy": score})
            self.bars.print(f"round {rnd}: accuracy {score:.4f} ({replies}/{sampled} clients)")
        self.save(state, rnd)
        self.bars.advance("rounds", info=f"acc {evaluations[-1]['accuracy']:.3f}" if evaluations else "")


REPORTED = ("num_examples", "train_loss", "train_loss_first", "train_loss_last", "distill_loss", "flops",
            "peak_memory_bytes", "seconds", "steps", "distill_steps", "examples_seen", "batched_clients")


def screen_reply(reply: Message, validate: Callable[[Message], None]) -> tuple[dict[str, Any], tuple | None]:
    """Sort a client's reply into ok / rejected / failed.

    Returns the fields for its metrics record and, when it is usable, the update
    ``(tensors, num_examples)``; `validate` raises `WireError` for a malformed reply.
    """
    if is_error(reply):
        return {"status": "failed", "error": str(reply.meta.get("error", ""))[:500]}, None
    try:
        validate(reply)
        n = float(reply.meta["num_examples"])
        if not n > 0:
            raise WireError(f"num_examples must be positive, got {n}")
    except (WireError, KeyError, TypeError, ValueError) as err:
        return {"status": "rejected", "error": str(err)[:500]}, None
    return {"status": "ok", **{k: reply.meta[k] for k in REPORTED if k in reply.meta}}, (reply.tensors, n)


def exchange(grid: Grid, messages: list[Message], bars: Bars) -> Iterator[Message]:
    """Send a round's messages and yield the replies in order, as they come.

    A grid whose ``parallel`` attribute is true (a networked or multi-process runtime, batched clients)
    gets the whole list in one call so it can run the clients concurrently. A grid with a ``stream``
    method (the local runtime) yields each reply while it already runs the next client, so the caller's
    screening of a reply overlaps the next client's training. Otherwise one message at a time. The
    progress bar moves with each reply.
    """
    if getattr(grid, "parallel", False):
        replies = grid.send_and_receive(messages)
        bars.advance("clients", by=len(messages))
        yield from replies
        return
    stream = getattr(grid, "stream", None)
    replies = stream(messages) if stream is not None else (
        reply for m in messages for reply in grid.send_and_receive([m]))
    for reply in replies:
        bars.advance("clients")
        yield reply


def serve(
    grid: Grid,
    global_state: State,
    strategy,
    *,
    rounds: int,
    clients_per_round: int,
    seed: int,
    eval_every: int,
    hooks: ServerHooks,
    min_replies: int = 1,
    counts_bytes: bool = True,
) -> tuple[State, list[dict[str, Any]]]:
    """Run the FedLLM round loop and return the final global state and the evaluations.

    Args:
        grid: Where the clients are.
        global_state: The initial adapter state (also the expected shape of every reply).
        strategy: An object with ``aggregate(global_state, updates) -> state``.
        rounds: Number of rounds.
        clients_per_round: Clients sampled (uniformly, seeded) each round.
        seed: Seed of the client sampling.
        eval_every: Evaluate every N rounds, and after the last.
        hooks: Evaluation, logging, checkpointing and progress.
        min_replies: Fewer valid replies than this keep the previous global state.
        counts_bytes: False for the centralized baseline, where nothing travels.
    """
    expect = spec_of(global_state)
    nodes = grid.node_ids()
    sampler = random.Random(seed)
    evaluations: list[dict[str, Any]] = []
    done = 0
    saved = hooks.resume("FedLLM")
    if saved is not None:
        check(Message(saved.tensors.get("global", {})), expect)
        device = next(iter(global_state.values())).device
        global_state = {k: v.to(device) for k, v in saved.tensors["global"].items()}
        strategy.load_state_dict({k: v.to(device) for k, v in saved.tensors.get("strategy", {}).items()})
        set_rng_state(sampler, saved.meta["sampler"])
        evaluations, done = saved.meta["evaluations"], saved.round
    hooks.bars.start("rounds", rounds)
    hooks.bars.advance("rounds", by=done)
    for rnd in range(done + 1, rounds + 1):
        chosen = sorted(sampler.sample(nodes, clients_per_round))
        hooks.bars.start("clients", len(chosen), info=f"round {rnd}")
        messages = [Message(global_state, {"kind": "fit_ins", "round": rnd, "dst": n}) for n in chosen]
        down = [encoded_size(m) for m in messages]
        replies = exchange(grid, messages, hooks.bars)
        updates = []
        for node, msg_bytes, reply in zip(chosen, down, replies):
            fields, update = screen_reply(reply, lambda r: check(r, expect))
            hooks.log({"type": "client", "round": rnd, "client": node,
                       "bytes_down": msg_bytes if counts_bytes else 0,
                       "bytes_up": encoded_size(reply) if counts_bytes else 0, **fields})
            if update is not None:
                updates.append(update)
        aggregated = len(updates) >= min_replies
        if aggregated:
            global_state = strategy.aggregate(global_state, updates)
        hooks.end_round(rnd, rounds, eval_every, global_state, evaluations, len(updates), len(chosen), aggregated)
        if hooks.checkpoint is not None:
            hooks.checkpoint.save(rnd, {"global": global_state, "strategy": strategy.state_dict()},
                                  {"sampler": rng_state(sampler), "evaluations": evaluations})
    return global_state, evaluations


# --------------------------------------------------------------------------- wiring


def settings_from(ctx: RunContext) -> TrainSettings:
    c = ctx.config
    f, t = c.federation, c.train
    s = TrainSettings(
        local_steps=t.local_steps, local_epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
        optimizer=t.optimizer, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        prox_mu=f.prox_mu if f.paradigm == "fedprox" else 0.0, count_flops=t.count_flops,
        cuda_graphs=t.cuda_graphs, compile=t.compile,
    )
    if f.paradigm == "centralized":
        # Same budget as the federation: per round, the steps (or examples) all sampled clients would take.
        s.local_steps = t.local_steps * f.clients_per_round if t.local_steps else None
        s.local_epochs = t.local_epochs * f.clients_per_round / f.num_clients if t.local_epochs else None
    return s


def make_clients(ctx: RunContext) -> dict[int, FedPeftClient]:
    """One client app per partition (a single one holding all data for the centralized baseline)."""
    settings = settings_from(ctx)
    centralized = ctx.config.federation.paradigm == "centralized"
    # One runner for all: clients share the model, and so its optimizer buffers and CUDA graphs.
    runner = make_runner(ctx.model, settings, device=ctx.device, pad_id=ctx.pad_id)
    return {
        i: FedPeftClient(i, ctx.model, ctx.client_examples(i), settings, device=ctx.device, pad_id=ctx.pad_id,
                         seed=ctx.config.seed, bars=ctx.bars, persistent_optimizer=centralized, runner=runner)
        for i in range(len(ctx.data.parts))
    }


def run_server(ctx: RunContext, grid: Grid) -> list[dict[str, Any]]:
    """The server side of a whole run; leaves the final global adapter in ``ctx.model`` and on disk."""
    f = ctx.config.federation
    centralized = f.paradigm == "centralized"

    hooks = ServerHooks.for_model(ctx)
    final, evaluations = serve(
        grid, adapter_state(ctx.model), make_strategy(f.strategy, f.server_lr, f.server_momentum),
        rounds=f.rounds, clients_per_round=1 if centralized else f.clients_per_round, seed=ctx.config.seed,
        eval_every=ctx.config.eval.every, hooks=hooks, min_replies=1 if centralized else f.min_replies,
        counts_bytes=not centralized,
    )
    load_adapter_state(ctx.model, final)
    return evaluations
