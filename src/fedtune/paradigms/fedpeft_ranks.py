"""FedLLM with LoRA ranks per client (``peft.client_ranks``) or a rank-aware ``peft.aggregation``.

The server keeps the global adapter at rank ``peft.r``. Round r:
  1. each sampled client gets the global adapter's first ``r_k`` components (its rank: `peft_methods.client_rank`);
  2. the client trains it (in simulation zero-padded into the shared rank-``peft.r`` model: the padded
     components have zero gradients, so they stay zero and the client trains exactly a rank-``r_k`` LoRA)
     and replies with its rank-``r_k`` adapter;
  3. the server aggregates (`fedtune.lora_aggregation`): ``zero_pad`` pads every reply to ``peft.r`` and
     hands them to the strategy (HetLoRA-style; any strategy); ``flexlora`` takes the exact weighted mean of
     the products B·A and keeps its truncated SVD at rank ``peft.r`` (FlexLoRA).

Every round logs ``separate_gap``: how far averaging A and B separately lands from the mean of the
products B·A (`lora_aggregation.separate_gap`). Bytes are the exact encoded sizes at each client's rank.
"""

from __future__ import annotations

from typing import Any

from .. import lora_aggregation as la
from ..grid import Grid, exchange
from ..peft_methods import client_rank
from ..rounds import RoundLoop, ServerHooks, aggregate, screen_reply
from ..strategies import aggregator_of, make_strategy
from ..train.adapter import State, adapter_state
from ..wire import Message, check, encoded_size, spec_of


class FlexLoRA:
    """FlexLoRA's server step: the exact weighted mean of the products, redistributed at `rank` by truncated SVD."""

    aggregator = None

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def aggregate(self, global_state: State, updates) -> State:
        deltas = la.product_mean([s for s, _ in updates], [n for _, n in updates])
        return la.redistribute(deltas, self.rank)

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state) -> None:
        pass


class ZeroPad:
    """HetLoRA-style: every update zero-padded to `rank`, then the strategy's own aggregation."""

    def __init__(self, strategy, rank: int) -> None:
        self.strategy, self.rank = strategy, rank
        self.aggregator = getattr(strategy, "aggregator", None)

    def aggregate(self, global_state: State, updates) -> State:
        return self.strategy.aggregate(global_state, [(la.zero_pad(s, self.rank), n) for s, n in updates])

    def state_dict(self) -> State:
        return self.strategy.state_dict()

    def load_state_dict(self, state) -> None:
        self.strategy.load_state_dict(state)


def serve_ranks(grid: Grid, global_state: State, strategy, ranks: dict[int, int], *, rounds: int,
                clients_per_round: int, seed: int, eval_every: int, hooks: ServerHooks,
                min_replies: int = 1) -> tuple[State, list[dict[str, Any]]]:
    """The round loop of clients of different ranks (`ranks`: node -> rank); returns the final global state."""
    loop = RoundLoop(hooks, "FedLLM", nodes=grid.node_ids(), rounds=rounds, clients_per_round=clients_per_round,
                     seed=seed, eval_every=eval_every)
    saved = loop.resume({"global": spec_of(global_state)}, device=next(iter(global_state.values())).device)
    if saved is not None:
        global_state = saved.tensors["global"]
        strategy.load_state_dict(saved.tensors.get("strategy", {}))
    for rnd, chosen in loop:
        down_states = {n: la.truncate(global_state, ranks[n]) for n in chosen}
        messages = [Message(down_states[n], {"kind": "fit_ins", "round": rnd, "dst": n, "rank": ranks[n]})
                    for n in chosen]
        down = [encoded_size(m) for m in messages]
        replies = exchange(grid, messages, lambda k: hooks.bars.advance("clients", by=k))
        updates = []
        for node, msg_bytes, reply in zip(chosen, down, replies):
            expect = spec_of(down_states[node])
            fields, update = screen_reply(reply, lambda r: check(r, expect))
            hooks.log({"type": "client", "round": rnd, "client": node, "rank": ranks[node], "bytes_down": msg_bytes,
                       "bytes_up": encoded_size(reply), **fields})
            if update is not None:
                updates.append(update)
        gap = la.separate_gap([s for s, _ in updates], [n for _, n in updates]) if updates else None
        hooks.log({"type": "lora_aggregation", "round": rnd, "separate_gap": gap})
        global_state, aggregated, note = aggregate(strategy, global_state, updates, min_replies=min_replies)
        loop.end(rnd, global_state, replies=len(updates), sampled=len(chosen), aggregated=aggregated, note=note,
                 checkpoint=lambda: ({"global": global_state, "strategy": strategy.state_dict()}, {}))
    return global_state, loop.evaluations


def run_ranked(ctx, grid: Grid) -> tuple[State, list[dict[str, Any]]]:
    """`serve_ranks` with the run's config: the strategy wrapped for ``peft.aggregation``, each client's rank."""
    c = ctx.config
    f, p = c.federation, c.peft
    if p.aggregation == "flexlora":
        strategy = FlexLoRA(p.r)
    else:
        strategy = ZeroPad(make_strategy(f.strategy, f.server_lr, f.server_momentum, aggregator_of(f)), p.r)
    ranks = {n: client_rank(p, n) for n in grid.node_ids()}
    return serve_ranks(grid, adapter_state(ctx.model), strategy, ranks, rounds=f.rounds,
                       clients_per_round=f.clients_per_round, seed=c.seed, eval_every=c.eval.every,
                       hooks=ServerHooks.for_model(ctx), min_replies=f.min_replies)
