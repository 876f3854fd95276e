"""FedKSeed: zeroth-order federated tuning with a shared pool of K seeds (Qin et al., ICML 2024).

Every party derives the same pool of K directions from the run seed (`fedtune.train.zeroth_order`).
Round r, as the server sees it (`serve`):
  1. sample clients and send each the history: every round's aggregated (seed index, scalar) entries
     so far (``fedkseed_ins``); nothing else travels down, and its size grows with the rounds, not the model;
  2. each client rebuilds the global weights by replaying the history onto the initial weights (a
     client that joins late replays it all), then takes ``local_steps`` zeroth-order steps: pick a
     seed k, two forward passes at w +/- eps z_k, no backward, ``w -= lr g z_k``; it replies with its
     (seed index, projected gradient) pairs only (``fedkseed_res``: 8 bytes a step);
  3. the server turns the replies into this round's entries (per seed, the example-weighted sum of
     ``-lr g``: the FedAvg of the clients' weights, exactly in real arithmetic), appends them to the
     history and replays them onto its own copy of the weights; evaluates every k rounds.

What is tuned: the LoRA adapter's parameters (``peft.*``), not all weights as in the paper. The
method is the same (directions over a flat parameter vector, replay by seeds), but on a CPU a
direction over the 135M model's every weight costs ~1 s to draw and each replay draws one per history
entry, while the LoRA adapter (0.2-1M values) takes a few ms; the adapter also starts as the identity
(LoRA's B is zero), so the base model's accuracy is the starting point, as for FedLLM. The tuned
parameters are float32 (as every adapter).

Messages:

  kind           dir   tensors                                               meta
  fedkseed_ins   down  history_seeds (m,) int32, history_scalars (m,) float32  round, num_seeds, eps, lr
  fedkseed_res   up    seeds (steps,) int32, grads (steps,) float32          num_examples, steps, flops, ...

Client FLOPs are the two forward passes of every step (FlopCounterMode around the real steps).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from ..data.tasks import Example, collate
from ..grid import ClientApp, Grid, exchange
from ..meter import ComputeMeter
from ..progress import Bars
from ..registry import Paradigm, register
from ..rounds import RoundLoop, ServerHooks, screen_reply
from ..train.adapter import adapter_params, unflatten
from ..train.local_steps import batches, round_rng, round_seed
from ..train.losses import lm_loss
from ..train.zeroth_order import apply, direction, flat, per_seed_sums, projected_gradient, to_wire, update, write
from ..wire import Message, WireError, check, encoded_size


@dataclass
class FedKSeedConfig:
    num_seeds: int = 1024
    """K, the size of the seed pool every party derives from the run seed (the paper uses 1024-4096)."""
    eps: float = 1e-3
    """Perturbation scale of the two-point estimate (L(w + eps z) - L(w - eps z)) / (2 eps)."""
    lr: float = 1e-4
    """Zeroth-order learning rate: each step moves the weights by -lr * g * z."""
    local_steps: int | None = None
    """Zeroth-order steps per client per round (two forward passes each; null: train.local_steps)."""
    batch_size: int | None = None
    """Examples per step (null: train.batch_size)."""

    def __post_init__(self) -> None:
        if self.num_seeds < 1:
            raise ValueError(f"fedkseed.num_seeds = {self.num_seeds!r} is not allowed: a positive integer "
                             "(e.g. 1024).")
        for name in ("eps", "lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"fedkseed.{name} = {v!r} is not allowed: a positive number.")
        for name in ("local_steps", "batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"fedkseed.{name} = {v!r} is not allowed: a positive integer, or null for "
                                 f"train.{name}.")


@dataclass
class Settings:
    """What a FedKSeed client needs (plain values)."""

    num_seeds: int
    eps: float
    lr: float
    steps: int
    batch_size: int
    run_seed: int
    count_flops: bool = True

    def mine(self) -> dict[str, Any]:
        return {"num_seeds": self.num_seeds, "eps": self.eps, "lr": self.lr}


def step_scalar(lr: float, g: float) -> float:
    """The coefficient of z_k in one step's update: ``-lr * g`` (clients and replays use this one expression)."""
    return -lr * g


# --------------------------------------------------------------------------- the weights, from seeds


class Replayer:
    """The tuned parameters' initial values, and the weights a history of (seed, scalar) entries gives.

    `weights` replays the history onto the initial weights; it remembers the last history it replayed
    and, when the next one extends it, replays only the new entries (the same operations in the same
    order, so the result is bitwise the same as replaying everything). In simulation the clients share
    one replayer, as they share one base model: the global weights are rebuilt once a round.
    """

    def __init__(self, params: list[torch.Tensor], run_seed: int) -> None:
        self.params = params
        self.run_seed = run_seed
        self.w0 = flat(params)
        self._seeds = torch.zeros(0, dtype=torch.int32)
        self._scalars = torch.zeros(0, dtype=torch.float32)
        self._w = self.w0.clone()

    @property
    def numel(self) -> int:
        return self.w0.numel()

    def weights(self, seeds: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        """A fresh copy of ``w0`` with the history ``(seeds[i], scalars[i])`` replayed in order."""
        m = len(self._seeds)
        if len(seeds) >= m and torch.equal(seeds[:m], self._seeds) and torch.equal(scalars[:m], self._scalars):
            w, start = self._w, m
        else:
            w, start = self.w0.clone(), 0
        apply(w, zip(seeds[start:].tolist(), scalars[start:].tolist()), self.run_seed)
        self._seeds, self._scalars, self._w = seeds.clone(), scalars.clone(), w
        return w.clone()


def model_params(model) -> tuple[list[str], list[torch.Tensor]]:
    """The tuned parameters: the LoRA adapter's, in PEFT key order."""
    params = adapter_params(model)
    assert params is not None, "the adapter's entries must be parameters of the model"
    return list(params), list(params.values())


# --------------------------------------------------------------------------- client side


class FedKSeedClient(ClientApp):
    """One client: its private examples, the shared model, and the shared `Replayer`."""

    def __init__(self, node_id: int, model, examples: list[Example], settings: Settings, *, replayer: Replayer,
                 device: torch.device, pad_id: int, bars: Bars | None = None) -> None:
        if not examples:
            raise ValueError(f"client {node_id} has no training examples")
        self.node_id, self.model, self.examples, self.settings = node_id, model, examples, settings
        self.replayer, self.device, self.pad_id = replayer, device, pad_id
        self.bars = bars or Bars(quiet=True)

    def __call__(self, msg: Message) -> Message:
        if msg.kind != "fedkseed_ins":
            raise ValueError(f"client {self.node_id} cannot handle a {msg.kind!r} message")
        s = self.settings
        theirs = {k: msg.meta.get(k) for k in s.mine()}
        if theirs != s.mine():
            raise ValueError(f"client {self.node_id} is configured for {s.mine()} but the server uses {theirs}")
        rnd = int(msg.meta["round"])
        replay = ComputeMeter(self.device, count_flops=False)
        with replay:
            w = self.replayer.weights(msg.tensors["history_seeds"], msg.tensors["history_scalars"])
        params = self.replayer.params
        rng, _ = round_rng(s.run_seed, rnd, self.node_id)
        pick = random.Random(round_seed(s.run_seed, rnd, self.node_id) ^ 0x5EED)
        pairs: list[tuple[int, float]] = []
        losses: list[float] = []
        self.model.eval()  # no dropout: both passes must see the same function
        self.bars.start("steps", s.steps, info=f"client {self.node_id}")
        meter = ComputeMeter(self.device, count_flops=s.count_flops)
        with meter:
            for chunk in batches(self.examples, s.batch_size, s.steps, rng):
                batch = {k: v.to(self.device) for k, v in collate(chunk, self.pad_id).items()}
                k = pick.randrange(s.num_seeds)
                z = direction(s.run_seed, k, w.numel(), w.device, w.dtype)
                g, plus, minus = projected_gradient(lambda: lm_loss(self.model, batch)[0], params, w, z, s.eps)
                g = to_wire(g)
                update(w, z, step_scalar(s.lr, g))
                pairs.append((k, g))
                losses.append((plus + minus) / 2)
                self.bars.advance("steps", info=f"client {self.node_id} loss {losses[-1]:.3f}")
            write(params, w)
        return Message({"seeds": torch.tensor([k for k, _ in pairs], dtype=torch.int32),
                        "grads": torch.tensor([g for _, g in pairs], dtype=torch.float32)}, {
            "kind": "fedkseed_res", "round": rnd, "src": self.node_id, "num_examples": len(self.examples),
            "steps": len(pairs), "examples_seen": len(pairs) * s.batch_size,
            "train_loss": sum(losses) / len(losses), "train_loss_first": losses[0], "train_loss_last": losses[-1],
            "flops": meter.flops, "peak_memory_bytes": meter.peak_memory_bytes, "seconds": meter.seconds,
            "replay_seconds": replay.seconds,
        })


# --------------------------------------------------------------------------- server side


def read_pairs(reply: Message, num_seeds: int, max_steps: int) -> list[tuple[int, float]]:
    """The (seed index, projected gradient) pairs of a ``fedkseed_res``; WireError when malformed."""
    if reply.kind != "fedkseed_res":
        raise WireError(f"expected a 'fedkseed_res' reply, got {reply.kind!r}")
    seeds = reply.tensors.get("seeds")
    n = 0 if seeds is None or seeds.dim() != 1 else len(seeds)
    if not 1 <= n <= max_steps:
        raise WireError(f"a reply must carry between 1 and {max_steps} (seed, scalar) pairs, got "
                        f"{None if seeds is None else tuple(seeds.shape)}")
    check(reply, {"seeds": ((n,), torch.int32), "grads": ((n,), torch.float32)})
    if int(seeds.min()) < 0 or int(seeds.max()) >= num_seeds:
        raise WireError(f"seed indices must lie in [0, {num_seeds})")
    return list(zip(seeds.tolist(), reply.tensors["grads"].tolist()))


def round_entries(updates: list[tuple[list[tuple[int, float]], float]], lr: float, num_seeds: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """This round's history entries from the clients' pairs, weighted by num_examples.

    Per seed: sum over clients of ``p_c * sum_j step_scalar(lr, g_cj)``; the result moves the global
    weights to the example-weighted mean of the clients' weights (exactly, in real arithmetic).
    Returns the nonzero entries by seed index, as they travel (int32 seeds, float32 scalars).
    """
    total = sum(n for _, n in updates)
    sums = torch.zeros(num_seeds, dtype=torch.float64)
    for pairs, n in updates:
        sums += per_seed_sums([(k, step_scalar(lr, g)) for k, g in pairs], num_seeds) * (n / total)
    keep = (sums != 0).nonzero().flatten()
    return keep.to(torch.int32), sums[keep].to(torch.float32)


def serve(grid: Grid, replayer: Replayer, keys: list[str], settings: Settings, *, rounds: int,
          clients_per_round: int, seed: int, eval_every: int, hooks: ServerHooks, min_replies: int = 1
          ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Run the FedKSeed round loop; return the final weights (flat) and the evaluations."""
    s = settings
    seeds = torch.zeros(0, dtype=torch.int32)
    scalars = torch.zeros(0, dtype=torch.float32)
    loop = RoundLoop(hooks, "FedKSeed", nodes=grid.node_ids(), rounds=rounds, clients_per_round=clients_per_round,
                     seed=seed, eval_every=eval_every)
    w = replayer.weights(seeds, scalars)

    def state() -> dict[str, torch.Tensor]:
        return {k: t.clone() for k, t in zip(keys, unflatten(w, replayer.params))}

    for rnd, chosen in loop:
        history = {"history_seeds": seeds, "history_scalars": scalars}
        messages = [Message(history, {"kind": "fedkseed_ins", "round": rnd, "dst": n, **s.mine()}) for n in chosen]
        down = [encoded_size(m) for m in messages]
        updates = []
        for node, msg_bytes, reply in zip(chosen, down, exchange(grid, messages,
                                                                  lambda n: hooks.bars.advance("clients", by=n))):
            fields, update_ = screen_reply(reply, lambda r: read_pairs(r, s.num_seeds, s.steps))
            hooks.log({"type": "client", "round": rnd, "client": node, "bytes_down": msg_bytes,
                       "bytes_up": encoded_size(reply), "pairs": len(reply.tensors.get("seeds", ())),
                       **({"replay_seconds": reply.meta["replay_seconds"]} if "replay_seconds" in reply.meta else {}),
                       **fields})
            if update_ is not None:
                updates.append((read_pairs(reply, s.num_seeds, s.steps), update_[1]))
        aggregated = len(updates) >= min_replies
        if aggregated:
            new_seeds, new_scalars = round_entries(updates, s.lr, s.num_seeds)
            seeds, scalars = torch.cat([seeds, new_seeds]), torch.cat([scalars, new_scalars])
            w = replayer.weights(seeds, scalars)
        hooks.log({"type": "paradigm", "round": rnd, "history_entries": len(seeds)})
        loop.end(rnd, state(), replies=len(updates), sampled=len(chosen), aggregated=aggregated)
    return w, loop.evaluations


# --------------------------------------------------------------------------- wiring


def settings_of(config) -> Settings:
    f, t = config.fedkseed, config.train
    steps = f.local_steps or t.local_steps
    return Settings(num_seeds=f.num_seeds, eps=f.eps, lr=f.lr, steps=steps, batch_size=f.batch_size or t.batch_size,
                    run_seed=config.seed, count_flops=t.count_flops)


def make_clients(ctx) -> dict[int, FedKSeedClient]:
    """One client per partition; all share the model and one `Replayer` (the global weights rebuilt once a round)."""
    _, params = model_params(ctx.model)
    replayer = Replayer(params, ctx.config.seed)
    s = settings_of(ctx.config)
    return {i: FedKSeedClient(i, ctx.model, ctx.client_examples(i), s, replayer=replayer, device=ctx.device,
                              pad_id=ctx.pad_id, bars=ctx.bars) for i in range(len(ctx.data.parts))}


def run_server(ctx, grid: Grid) -> list[dict[str, Any]]:
    """The server side of a whole run; leaves the final adapter in ``ctx.model`` and on disk."""
    f = ctx.config.federation
    keys, params = model_params(ctx.model)
    replayer = Replayer(params, ctx.config.seed)
    w, evaluations = serve(grid, replayer, keys, settings_of(ctx.config), rounds=f.rounds,
                           clients_per_round=f.clients_per_round, seed=ctx.config.seed,
                           eval_every=ctx.config.eval.every, hooks=ServerHooks.for_model(ctx),
                           min_replies=f.min_replies)
    write(params, w)
    return evaluations


def _validate(config) -> None:
    if config.fedkseed.local_steps is None and config.train.local_steps is None:
        raise ValueError("federation.paradigm = 'fedkseed' counts steps, not epochs: set fedkseed.local_steps "
                         "(or train.local_steps).")


register(Paradigm(
    "fedkseed", "FedKSeed", "zeroth-order tuning of the LoRA adapter from a shared pool of seeds: two forward "
    "passes a step, only (seed, scalar) pairs travel", make_clients, run_server, access="white", backprop=False,
    section=("fedkseed", FedKSeedConfig), validate=_validate,
    # Not resumable yet: the history (seeds, scalars) would be the whole server state; not implemented.
    checkpoints=lambda config: False, strategy_label="fedavg (per-seed scalars)",
))
