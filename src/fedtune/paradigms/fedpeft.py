"""FedLLM: federated PEFT (LoRA) with FedAvg and friends, FedProx, and the centralized baseline.

Round r, as the server sees it (`serve`):
  1. sample ``clients_per_round`` clients and send each the global adapter state;
  2. each client loads it, trains ``local_steps`` steps on its own data, and
     replies with its adapter state and ``num_examples`` (`FedPeftClient`);
  3. validate every reply (keys, shapes, dtypes, finite values), drop the bad
     ones, aggregate the rest with the strategy, and evaluate every k rounds.

Bytes are the exact encoded sizes of the messages; client compute is measured
by the client around its real training steps and reported in its reply.
Registered as ``fedpeft``, ``fedprox`` (the client adds FedProx's proximal term)
and ``centralized`` (one client holding all training data, the same step budget).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import client_state
from ..checkpoint import ClientStore
from ..compression import ServerLink
from ..data.tasks import Example
from ..grid import ClientApp, Grid, exchange
from ..meter import ComputeMeter
from ..progress import Bars
from ..rounds import RoundLoop, ServerHooks, aggregate, screen_reply, update_norm
from ..secagg import wrap_clients
from ..strategies import aggregator_of, make_strategy
from ..train.adapter import State, adapter_snapshot, adapter_state, load_adapter_state, pinned_copy
from ..train.local_steps import TrainSettings, batches, round_rng, settings_from
from ..train.step_runner import StepRunner, make_runner
from ..wire import Message, check, encoded_size, meta_number, spec_of
from .. import lora_aggregation as la
from ..peft_methods import client_rank, ranked_in, ranks_apply
from .fedpeft_batched import BatchedFedPeft
from .fedpeft_ranks import run_ranked
from ..registry import Paradigm, register
from .. import cai, safety_filter


# --------------------------------------------------------------------------- client side


class FedPeftClient(ClientApp):
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
        rank: int | None = None,
        extras: client_state.ClientState | None = None,
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
        self.rank = rank  # a LoRA rank of its own (peft.client_ranks): zero-padded in, truncated out
        self._trained = False
        self.extras = extras  # state kept between rounds (SCAFFOLD, compression), or None

    def __call__(self, msg: Message) -> Message:
        return self.start(msg)()

    def start(self, msg: Message) -> Callable[[], Message]:
        """Queue this client's round; return the function that waits for it and gives the reply.

        With CUDA graphs nothing here waits for the GPU (the steps, the losses and the copy of the
        adapter are queued in stream order), so a runtime can queue the next client's round before
        taking this one's reply (the local runtime's `LocalGrid`): the GPU never idles while the
        host screens replies or prepares batches. Elsewhere the work is done when this returns.
        """
        rnd = int(meta_number(msg, "round", integer=True))
        extras = self.extras
        tensors = msg.tensors if extras is None else extras.open(rnd, msg.tensors)
        load_adapter_state(self.model, tensors if self.rank is None else ranked_in(self.model, tensors))
        runner = self.runner
        runner.reset(keep_optimizer=self.persistent_optimizer and self._trained)
        if extras is not None:
            extras.correct(runner, self.model)
        self._trained = True
        steps = self.settings.steps_for(len(self.examples))
        # Seeded by (run seed, round, client) so results do not depend on the order clients run in.
        rng, torch_seed = round_rng(self.seed, rnd, self.node_id)
        torch.manual_seed(torch_seed)
        seen = 0
        self.bars.start("steps", steps, info=f"client {self.node_id}")
        if not self.model.training:  # train() walks every module (~25 ms on the 135M model): only when needed
            self.model.train()
        # The runner counts FLOPs itself, once per batch shape (a replayed CUDA graph dispatches nothing
        # a FlopCounterMode could see, and counting every step would cost more than the step on a GPU).
        # With graphs the client is timed on the GPU (CUDA events) instead of waiting for it.
        meter = ComputeMeter(self.device, count_flops=False, sync=not runner.graphs)
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
        flops = runner.flops if self.settings.count_flops else None
        state, wait = adapter_snapshot(self.model)  # waiting for it also covers the losses, queued first

        def reply() -> Message:
            wait()
            values = losses.tolist()
            mine = state if self.rank is None else la.truncate(state, self.rank)
            tensors = mine if extras is None else extras.close(rnd, mine, len(values))
            return Message(tensors, {
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




# --------------------------------------------------------------------------- server side


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
    secure=None,
    after_aggregate: Callable[[int, State], State] | None = None,
    link: ServerLink | None = None,
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
        secure: A `fedtune.secagg_server.SecAggServer`: each round's exchange and average run through secure
            aggregation instead (the server sees only the masked sum of the updates).
        after_aggregate: ``(round, state) -> state``: the server's own step on a freshly aggregated state
            (constitutional AI, `fedtune.cai`), or None.
        link: Compresses what goes down and decodes what comes up (`fedtune.compression`), or None.
    """
    expect = spec_of(global_state)
    # SCAFFOLD sends its control variate beside the adapter and gets the clients' changes of theirs back.
    payload = getattr(strategy, "payload", lambda state: state)
    expect_up = strategy.reply_spec(expect) if hasattr(strategy, "reply_spec") else expect
    loop = RoundLoop(hooks, "FedLLM", nodes=grid.node_ids(), rounds=rounds, clients_per_round=clients_per_round,
                     seed=seed, eval_every=eval_every)
    saved = loop.resume({"global": expect}, device=next(iter(global_state.values())).device)
    if saved is not None:
        global_state = saved.tensors["global"]
        strategy.load_state_dict(saved.tensors.get("strategy", {}))
        if link is not None:
            link.load_state_dict(saved.tensors.get("link", {}))
    for rnd, chosen in loop:
        if secure is not None:  # secure aggregation: the round's exchange and average in one (fedtune.secagg)
            global_state, ok, aggregated, note = secure.round(
                grid, rnd, chosen, global_state, strategy, log=hooks.log, min_replies=min_replies,
                advance=lambda n: hooks.bars.advance("clients", by=n))
            if aggregated and after_aggregate is not None:
                global_state = after_aggregate(rnd, global_state)
            loop.end(rnd, global_state, replies=ok, sampled=len(chosen), aggregated=aggregated, note=note,
                     checkpoint=lambda: ({"global": global_state, "strategy": strategy.state_dict()}, {}))
            continue
        sent = payload(global_state)
        messages = [Message(sent if link is None else link.send(n, rnd, sent), {"kind": "fit_ins", "round": rnd,
                                                                                 "dst": n}) for n in chosen]
        down = [encoded_size(m) for m in messages]
        replies = exchange(grid, messages, lambda n: hooks.bars.advance("clients", by=n))
        updates = []
        for node, msg_bytes, reply in zip(chosen, down, replies):
            fields, update = screen_reply(reply, lambda r: check(r, expect_up), None if link is None else
                                          lambda r: link.receive(node, r.tensors, expect_up))
            hooks.log({"type": "client", "round": rnd, "client": node,
                       "bytes_down": msg_bytes if counts_bytes else 0,
                       "bytes_up": encoded_size(reply) if counts_bytes else 0, **fields,
                       **update_norm(update, global_state)})
            if update is not None:
                updates.append(update)
        global_state, aggregated, note = aggregate(strategy, global_state, updates, min_replies=min_replies,
                                                   privacy=hooks.privacy)
        if aggregated and after_aggregate is not None:
            global_state = after_aggregate(rnd, global_state)
        loop.end(rnd, global_state, replies=len(updates), sampled=len(chosen), aggregated=aggregated, note=note,
                 checkpoint=lambda: ({"global": global_state, "strategy": strategy.state_dict(),
                                      **({"link": link.state_dict()} if link is not None else {})}, {}))
    return global_state, loop.evaluations


# --------------------------------------------------------------------------- wiring


def fedpeft_settings(ctx) -> TrainSettings:
    """The clients' settings: ``train.*``, FedProx's ``prox_mu``, and the centralized baseline's budget."""
    c = ctx.config
    f, t = c.federation, c.train
    s = settings_from(c, prox_mu=f.prox_mu if f.paradigm == "fedprox" else 0.0)
    s.control_variates = f.strategy == "scaffold"
    if f.paradigm == "centralized":
        # Same budget as the federation: per round, the steps (or examples) all sampled clients would take.
        s.local_steps = t.local_steps * f.clients_per_round if t.local_steps else None
        s.local_epochs = t.local_epochs * f.clients_per_round / f.num_clients if t.local_epochs else None
    return s


def make_clients(ctx) -> dict[int, FedPeftClient]:
    """One client app per partition (a single one holding all data for the centralized baseline)."""
    settings = fedpeft_settings(ctx)
    centralized = ctx.config.federation.paradigm == "centralized"
    # One runner for all: clients share the model, and so its optimizer buffers and CUDA graphs.
    runner = make_runner(ctx.model, settings, device=ctx.device, pad_id=ctx.pad_id)
    ranked = ranks_apply(ctx.config) and not centralized
    keeps, stores = client_state.needed(ctx.config), client_state.store_dir(ctx)
    initial = adapter_state(ctx.model) if keeps else {}

    def extras(i: int) -> client_state.ClientState | None:
        store = ClientStore(stores / f"client-{i}.safetensors", ctx.config) if stores else None
        return client_state.ClientState(i, ctx.config, initial, store) if keeps else None

    return wrap_clients(ctx.config, {
        i: FedPeftClient(i, ctx.model, safety_filter.client_examples(ctx, i), settings, device=ctx.device,
                         pad_id=ctx.pad_id, seed=ctx.config.seed, bars=ctx.bars, persistent_optimizer=centralized,
                         runner=runner, rank=client_rank(ctx.config.peft, i) if ranked else None, extras=extras(i))
        for i in range(len(ctx.data.parts))
    })


def run_server(ctx, grid: Grid) -> list[dict[str, Any]]:
    """The server side of a whole run; leaves the final global adapter in ``ctx.model`` and on disk."""
    f = ctx.config.federation
    secure = None
    if ctx.config.secagg.enabled:
        from ..secagg_server import server_for  # imports Flower: only for a run that asks for secure aggregation
        secure = server_for(ctx)
    centralized = f.paradigm == "centralized"
    if ranks_apply(ctx.config) and not centralized:  # peft.client_ranks / peft.aggregation: fedpeft_ranks
        final, evaluations = run_ranked(ctx, grid)
        load_adapter_state(ctx.model, final)
        return evaluations
    start = adapter_state(ctx.model)
    final, evaluations = serve(
        grid, start, make_strategy(f.strategy, f.server_lr, f.server_momentum, aggregator_of(f), f.num_clients),
        rounds=f.rounds, clients_per_round=1 if centralized else f.clients_per_round, seed=ctx.config.seed,
        eval_every=ctx.config.eval.every, hooks=ServerHooks.for_model(ctx), min_replies=1 if centralized else f.min_replies,
        counts_bytes=not centralized, secure=secure, after_aggregate=cai.step_for(ctx),
        link=client_state.server_link(ctx.config, start) if ctx.config.compression.kind != "none" else None,
    )
    load_adapter_state(ctx.model, final)
    return evaluations


make_clients.screens_pairs = True  # clients screen their pairs (safety.filter: fedtune.safety)
run_server.runs_cai = True  # the server's constitutional-AI step after aggregating (safety.cai: fedtune.cai)


def _batched(clients: dict[int, Any]) -> BatchedFedPeft:
    for app in clients.values():
        if not isinstance(app, FedPeftClient):
            raise ValueError("runtime.batch_clients > 1 batches FedLLM clients only (federation.paradigm fedpeft or "
                             f"fedprox), got a {type(app).__name__}: set runtime.batch_clients=1.")
    return BatchedFedPeft(clients)


def _centralized_needs(config, runtime: str) -> str | None:
    if runtime == "flower":
        return ("federation.paradigm = 'centralized' does not run on Flower: the centralized baseline has no "
                "clients; run it with `fedtune run`.")
    return None


register(Paradigm("fedpeft", "FedLLM", "LoRA adapters trained on clients and averaged by the server (FedAvg, "
                  "FedAvgM, FedAdam, FedYogi, FedAdagrad, SCAFFOLD)", make_clients, run_server, batched=_batched,
                  needs=client_state.needs, update_link=True, averages_updates=True, lora_ranks=True))
register(Paradigm("fedprox", "FedLLM (FedProx)", "FedLLM whose clients add the proximal term federation.prox_mu",
                  make_clients, run_server, batched=_batched, needs=client_state.needs, update_link=True,
                  averages_updates=True, lora_ranks=True))
register(Paradigm("centralized", "centralized", "all training data on one client, the same step budget: the "
                  "reference point", make_clients, run_server, single_client=True, stateful_clients=True,
                  checkpoints=lambda config: False, needs=_centralized_needs))
