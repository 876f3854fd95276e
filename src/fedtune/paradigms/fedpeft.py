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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from .. import config as cfg
from ..checkpoint import Checkpoint, Saved, rng_state, set_rng_state
from ..context import RunContext
from ..data.tasks import Example, collate
from ..grid import Grid, is_error
from ..losses import lm_loss, proximal_term
from ..meter import ComputeMeter
from ..progress import Bars
from ..strategies import make_strategy
from ..wire import Message, WireError, check, encoded_size, spec_of

State = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- client side


def adapter_state(model) -> State:
    """A detached copy of the model's trainable adapter state (PEFT key names)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state: State, expected: set[str] | None = None, what: str = "adapter") -> None:
    """Copy `state` into the model's adapter; missing or unexpected keys are errors, never skipped.

    ``expected`` narrows the keys `state` must have to part of the adapter (split learning loads one side).
    """
    if expected is None:
        expected = set(get_peft_model_state_dict(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise WireError(f"{what} state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise WireError(f"adapter state has keys the model lacks: {unexpected[:3]}")


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

    def steps_for(self, num_examples: int) -> int:
        if self.local_steps is not None:
            return self.local_steps
        return max(1, math.ceil(self.local_epochs * num_examples / self.batch_size))


def make_optimizer(params: list[torch.Tensor], s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def batches(examples: list[Example], batch_size: int, steps: int, rng: random.Random):
    """`steps` batches drawn by walking shuffled epochs of `examples` (a short last batch is skipped)."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, len(examples)):
            order = list(range(len(examples)))
            rng.shuffle(order)
        take, order = order[:batch_size], order[batch_size:]
        yield [examples[i] for i in take]


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
        self._optimizer: torch.optim.Optimizer | None = None

    def __call__(self, msg: Message) -> Message:
        rnd = int(msg.meta["round"])
        load_adapter_state(self.model, {k: v.to(self.device) for k, v in msg.tensors.items()})
        params = [p for p in self.model.parameters() if p.requires_grad]
        anchor = [p.detach().clone() for p in params] if self.settings.prox_mu > 0 else None
        if self._optimizer is None or not self.persistent_optimizer:
            self._optimizer = make_optimizer(params, self.settings)
        opt = self._optimizer
        steps = self.settings.steps_for(len(self.examples))
        # Seeded by (run seed, round, client) so results do not depend on the order clients run in.
        rng = random.Random(hash((self.seed, rnd, self.node_id)) & 0xFFFFFFFF)
        torch.manual_seed(rng.getrandbits(62))
        losses: list[float] = []
        seen = 0
        self.bars.start("steps", steps, info=f"client {self.node_id}")
        self.model.train()
        meter = ComputeMeter(self.device, count_flops=self.settings.count_flops)
        with meter:
            for chunk in batches(self.examples, self.settings.batch_size, steps, rng):
                batch = {k: v.to(self.device) for k, v in collate(chunk, self.pad_id).items()}
                loss, _ = lm_loss(self.model, batch)
                total = loss + proximal_term(params, anchor, self.settings.prox_mu) if anchor is not None else loss
                opt.zero_grad(set_to_none=True)
                total.backward()
                if self.settings.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
                opt.step()
                losses.append(float(loss.detach()))
                seen += len(chunk)
                self.bars.advance("steps", info=f"client {self.node_id} loss {losses[-1]:.3f}")
        self.model.eval()
        return Message(
            adapter_state(self.model),
            {
                "kind": "fit_res",
                "round": rnd,
                "src": self.node_id,
                "num_examples": len(self.examples),
                "examples_seen": seen,
                "steps": len(losses),
                "train_loss": sum(losses) / len(losses),
                "train_loss_first": losses[0],
                "train_loss_last": losses[-1],
                "flops": meter.flops,
                "peak_memory_bytes": meter.peak_memory_bytes,
                "seconds": meter.seconds,
            },
        )


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

        checkpoint = Checkpoint(ctx.path, cfg.to_yaml(ctx.config)) if ctx.config.runtime.checkpoint else None
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
            "peak_memory_bytes", "seconds", "steps", "distill_steps", "examples_seen")


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


def exchange(grid: Grid, messages: list[Message], bars: Bars) -> list[Message]:
    """Send a round's messages and return the replies in order.

    A grid whose ``parallel`` attribute is true (a networked or multi-process runtime, batched clients)
    gets the whole list in one call so it can run the clients concurrently; otherwise one message at a
    time, so the progress bar moves with each client.
    """
    if getattr(grid, "parallel", False):
        replies = grid.send_and_receive(messages)
        bars.advance("clients", by=len(messages))
        return replies
    replies = []
    for m in messages:
        replies.extend(grid.send_and_receive([m]))
        bars.advance("clients")
    return replies


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
    return {
        i: FedPeftClient(i, ctx.model, ctx.client_examples(i), settings, device=ctx.device, pad_id=ctx.pad_id,
                         seed=ctx.config.seed, bars=ctx.bars, persistent_optimizer=centralized)
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
