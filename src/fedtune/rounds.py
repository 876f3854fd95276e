"""What every paradigm's round loop does around its own exchange, written once.

A round loop reads top to bottom in its paradigm's file: sample, exchange, aggregate. What they all
share lives here: `RoundLoop` samples the clients of each round (seeded), drives the progress bars,
resumes from a checkpoint (checked against the expected tensors, restored onto the device the run
computes on, sampler and evaluations included), and ends each round the same way (log the round,
evaluate every k rounds and after the last, save the adapter, checkpoint). `screen_reply` sorts a
client's reply into ok / rejected / failed for every paradigm.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import Checkpoint, Saved, rng_state, set_rng_state
from .checkpoint import enabled as checkpointing
from . import attacks, privacy as dp
from .grid import is_error
from .progress import Bars
from .robust import cap_weights
from .train.adapter import State, load_adapter_state
from .wire import Message, WireError, check, meta_number

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class ServerHooks:
    """What a round loop needs from the experiment around it, as plain callables."""

    evaluate: Callable[[State], float]
    log: Callable[[dict[str, Any]], None]
    save: Callable[[State, int], None]
    bars: Bars
    checkpoint: Checkpoint | None = None
    """Where the round loop saves its state after every round and resumes from (``runtime.checkpoint``)."""
    privacy: dp.ClientDP | None = None
    """Client-level DP (``privacy.dp``): `aggregate` takes the private mean; its state is checkpointed."""
    extras: Callable[[], dict[str, Any]] | None = None
    """More fields for each evaluation record (epsilon, a backdoor's success rate), right after `evaluate`."""

    @classmethod
    def for_model(cls, ctx, load: Callable[[State], None] | None = None) -> "ServerHooks":
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
        private = dp.from_config(ctx.config)

        def extras() -> dict[str, Any]:
            return {**(private.spent() if private is not None else {}), **attacks.eval_fields(ctx)}

        return cls(evaluate=evaluate, log=ctx.log, save=save, bars=ctx.bars, checkpoint=checkpoint,
                   privacy=private, extras=extras)


class RoundLoop:
    """The rounds of one run: who is sampled, where a resumed run continues, and how each round ends.

    Args:
        hooks: Evaluation, logging, saving, checkpointing and progress.
        name: The paradigm's name as the console shows it ("FedLLM", ...).
        nodes: The client node ids to sample from.
        rounds: Number of rounds.
        clients_per_round: Clients sampled (uniformly, seeded) each round.
        seed: Seed of the sampling.
        eval_every: Evaluate every N rounds, and after the last.
    """

    def __init__(self, hooks: ServerHooks, name: str, *, nodes: list[int], rounds: int, clients_per_round: int,
                 seed: int, eval_every: int) -> None:
        self.hooks = hooks
        self.name = name
        self.nodes = list(nodes)
        self.rounds = rounds
        self.clients_per_round = clients_per_round
        self.eval_every = eval_every
        self.sampler = random.Random(seed)
        self.evaluations: list[dict[str, Any]] = []
        self.done = 0
        self.last_good = 0  # the last round whose global state was saved

    def resume(self, expect: dict[str, Spec], device: torch.device | str) -> Saved | None:
        """The checkpoint to continue from, if any, with every tensor on `device`.

        `expect` gives, for the groups whose shapes are known up front (the global adapter), the
        names, shapes and dtypes they must have; a checkpoint that does not fit is refused with a
        `WireError`. The sampler, the evaluations and the round to continue after are restored here.
        """
        checkpoint = self.hooks.checkpoint
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is None:
            return None
        if checkpoint.fallback:
            self.hooks.bars.print(f"{self.name}: {checkpoint.fallback}")
        for group, spec in expect.items():
            check(Message(saved.tensors.get(group, {})), spec)
        saved.tensors = {g: {k: v.to(device) for k, v in ts.items()} for g, ts in saved.tensors.items()}
        try:
            set_rng_state(self.sampler, saved.meta["sampler"])
            self.evaluations, self.done = list(saved.meta["evaluations"]), saved.round
            if self.hooks.privacy is not None:
                self.hooks.privacy.load(saved.meta["privacy"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{checkpoint.path} is not a readable fedtune checkpoint (its sampler or evaluations "
                             f"are malformed: {type(err).__name__} {err}); delete it to start this folder over.") from None
        self.last_good = saved.round
        self.hooks.bars.print(f"{self.name}: resuming from the checkpoint after round {saved.round}")
        return saved

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        """``(round, sampled clients)`` for every round still to run."""
        bars = self.hooks.bars
        bars.start("rounds", self.rounds)
        bars.advance("rounds", by=self.done)
        for rnd in range(self.done + 1, self.rounds + 1):
            chosen = sorted(self.sampler.sample(self.nodes, self.clients_per_round))
            bars.start("clients", len(chosen), info=f"round {rnd}")
            yield rnd, chosen

    def end(self, rnd: int, state: State, *, replies: int, sampled: int, aggregated: bool,
            checkpoint: Callable[[], tuple[dict[str, State], dict[str, Any]]] | None = None,
            note: str = "") -> None:
        """Log the round, evaluate (every `eval_every` rounds and after the last), save, checkpoint, move the bar.

        ``checkpoint`` returns the paradigm's own state to checkpoint (tensor groups and JSON meta); the
        sampler and the evaluations are added here. Called only when the run checkpoints. ``note`` says why
        a round did not aggregate (`aggregate`). A global state holding NaN/Inf stops the run with a
        `ValueError` before anything of this round is saved: the last good round's adapter and checkpoint stay.
        """
        hooks = self.hooks
        record = {"type": "round", "round": rnd, "replies": replies, "failed": sampled - replies,
                  "aggregated": aggregated, **({"note": note} if note else {}),
                  **(hooks.privacy.take() if hooks.privacy is not None else {})}
        bad = nonfinite_keys(state)
        if bad:
            hooks.log({**record, "error": f"non-finite global state ({bad[0]!r})"})
            raise ValueError(
                f"round {rnd}: the global state holds NaN/Inf (in {len(bad)} tensor(s), e.g. {bad[0]!r}), so the "
                f"run stops here; the adapter and checkpoint of round {self.last_good} are kept in the run folder. "
                "Lower train.lr, keep train.max_grad_norm set, or defend the average (federation.aggregator).")
        hooks.log(record)
        if rnd % self.eval_every == 0 or rnd == self.rounds:
            score = hooks.evaluate(state)
            extras = hooks.extras() if hooks.extras is not None else {}
            self.evaluations.append({"round": rnd, "accuracy": score, **extras})
            hooks.log({"type": "eval", "round": rnd, "accuracy": score, **extras})
            hooks.bars.print(f"round {rnd}: accuracy {score:.4f} ({replies}/{sampled} clients)"
                             + "".join(f", {k} {v:.3g}" for k, v in extras.items()))
        hooks.save(state, rnd)
        if hooks.checkpoint is not None:
            tensors, meta = checkpoint() if checkpoint is not None else ({}, {})
            hooks.checkpoint.save(rnd, tensors, {**meta, "sampler": rng_state(self.sampler),
                                                 "evaluations": self.evaluations,
                                                 **({"privacy": hooks.privacy.state()} if hooks.privacy else {})})
        self.last_good = rnd
        hooks.bars.advance("rounds", info=f"acc {self.evaluations[-1]['accuracy']:.3f}" if self.evaluations else "")


def nonfinite_keys(state: State) -> list[str]:
    """The names of the floating tensors of `state` that hold NaN or Inf."""
    return [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def aggregate(strategy, global_state: State, updates: list[tuple], *, min_replies: int,
              privacy: dp.ClientDP | None = None) -> tuple[State, bool, str]:
    """One round's aggregation, as every paradigm that averages updates does it: ``(state, aggregated, note)``.

    Fewer than `min_replies` updates keep the previous global state. So does an aggregate that holds NaN
    or Inf (finite updates of 3e38 overflow a float32 sum): the strategy's own buffers are put back as they
    were, and the note says why, so one round of hostile updates never poisons the global model for good.
    A weight over ``federation.max_weight`` times the median weight is capped first (`robust.cap_weights`),
    the note naming each cap. With client-level DP (`privacy`), the strategy gets the private mean of the
    updates (`fedtune.privacy.ClientDP.combine`) as its one update instead.
    """
    if len(updates) < min_replies:
        return global_state, False, f"{len(updates)} valid replies, fewer than federation.min_replies = {min_replies}"
    notes: list[str] = []
    agg = getattr(strategy, "aggregator", None)
    if privacy is not None:
        updates = [(privacy.combine(global_state, [state for state, _ in updates]), 1.0)]
    elif agg is not None and agg.max_weight is not None:
        weights, notes = cap_weights([n for _, n in updates], agg.max_weight)
        updates = [(state, w) for (state, _), w in zip(updates, weights)]
    before = strategy.state_dict()
    new = strategy.aggregate(global_state, updates)
    bad = nonfinite_keys(new)
    if bad:
        strategy.load_state_dict(before)
        return global_state, False, "; ".join([*notes, (
            f"the aggregate held NaN/Inf (in {len(bad)} tensor(s), e.g. {bad[0]!r}): the previous global state is kept")])
    return new, True, "; ".join(notes)


REPORTED = ("num_examples", "train_loss", "train_loss_first", "train_loss_last", "distill_loss", "flops",
            "peak_memory_bytes", "seconds", "steps", "distill_steps", "examples_seen", "batched_clients")
"""The fields of a client's reply that go into its metrics record."""

MAX_NUM_EXAMPLES = 2**53
"""Largest ``num_examples`` a reply may claim (a float holds every integer up to it); `federation.max_weight`
caps what a claim weighs in the average."""

_COUNTS = ("flops", "peak_memory_bytes", "steps", "distill_steps", "examples_seen", "batched_clients")
_LOSSES = ("train_loss", "train_loss_first", "train_loss_last", "distill_loss")


def _metric_problem(key: str, value: Any) -> str | None:
    """Why a client-reported metric cannot go into the metrics record as it is, or None when it can.

    Counts are non-negative integers (``flops`` may be null: not counted); ``seconds`` a finite
    non-negative number; losses any number (a diverged loss, NaN or Inf, is worth reporting) or null.
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in _COUNTS:
        if key == "flops" and value is None:
            return None
        if not (number and isinstance(value, int) or (number and math.isfinite(value) and value == int(value))):
            return f"must be a non-negative integer, got {type(value).__name__} {value!r:.40}"
        return None if 0 <= value <= 2**63 else f"must be in [0, 2**63], got {value!r:.40}"
    if key == "seconds":
        return None if number and math.isfinite(value) and value >= 0 else \
            f"must be a finite number of seconds >= 0, got {type(value).__name__} {value!r:.40}"
    if key in _LOSSES:  # null: no such loss this round (a KD client's first round has no soft labels)
        return None if number or value is None else f"must be a number or null, got {type(value).__name__} {value!r:.40}"
    return None


def screen_metrics(meta: dict[str, Any]) -> dict[str, Any]:
    """The reported fields of a reply (`REPORTED`, less ``num_examples``) fit for the metrics record.

    A field of the wrong type or out of range is dropped and its reason recorded under
    ``dropped_metrics``, so one client's ``flops: "x"`` or ``seconds: null`` never crashes the report.
    """
    fields: dict[str, Any] = {}
    dropped: dict[str, str] = {}
    for key in REPORTED:
        if key == "num_examples" or key not in meta:
            continue
        why = _metric_problem(key, meta[key])
        if why is None:
            fields[key] = int(meta[key]) if key in _COUNTS and meta[key] is not None else meta[key]
        else:
            dropped[key] = why
    if dropped:
        fields["dropped_metrics"] = dropped
    return fields


def update_norm(update: tuple | None, reference: State) -> dict[str, float]:
    """``{"update_norm": ||update - reference||_2}`` over the reference's tensors (a client's change to the global
    state, the figure DP clipping and norm bounding act on; trackers histogram it), or ``{}`` without an update."""
    if update is None:
        return {}
    tensors = update[0]
    total = sum(float((tensors[k].double() - v.double()).pow(2).sum()) for k, v in reference.items() if k in tensors)
    return {"update_norm": math.sqrt(total)}


def screen_reply(reply: Message, validate: Callable[[Message], None],
                 decode: Callable[[Message], dict[str, torch.Tensor]] | None = None) -> tuple[dict[str, Any], tuple | None]:
    """Sort a client's reply into ok / rejected / failed.

    Returns the fields for its metrics record and, when it is usable, the update
    ``(tensors, num_examples)``; `validate` raises `WireError` for a malformed reply. ``num_examples``
    must be an integer in [1, 2**53] (not a bool, a string, NaN, Infinity or 10**400); reported metrics
    of the wrong type or range are dropped with the reason (`screen_metrics`). ``decode`` gives a compressed
    reply's full tensors (`fedtune.compression`), validated and returned in its place.
    """
    if is_error(reply):
        return {"status": "failed", "error": str(reply.meta.get("error", ""))[:500]}, None
    try:
        if decode is not None:
            reply = Message(decode(reply), reply.meta)
        validate(reply)
        n = meta_number(reply, "num_examples", integer=True, maximum=MAX_NUM_EXAMPLES)
    except (WireError, KeyError, TypeError, ValueError, OverflowError) as err:
        return {"status": "rejected", "error": str(err)[:500]}, None
    return {"status": "ok", "num_examples": n, **screen_metrics(reply.meta)}, (reply.tensors, float(n))
