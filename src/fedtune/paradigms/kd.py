"""KD-FedLLM: federated knowledge distillation on a public set of unlabeled prompts.

Round r, as the server sees it (`serve`):
  1. sample ``clients_per_round`` clients and send each the soft labels aggregated in the
     previous round (nothing in round 1);
  2. each client, on its own persistent LoRA adapter (clients never receive weights), distils
     toward the soft labels for ``kd.distill_steps`` steps, trains ``train.local_steps`` steps on
     its private data (the FedLLM loss), then replies with its compressed logits on the public set
     and ``num_examples`` (`KDClient`);
  3. validate every reply, turn the logits into probabilities at temperature ``kd.temperature``,
     take their example-weighted mean (`distill.aggregate_dense` / `distill.aggregate_topk`),
     distil that into the global adapter for ``kd.server_steps`` steps, keep it as the next
     round's soft labels, evaluate every k rounds, and checkpoint (`fedtune.checkpoint`: the global
     adapter, the server's optimizer, the soft labels, the sampler; clients keep their own adapters
     by round in a `checkpoint.ClientStore`, so a resumed run equals an uninterrupted one).

What travels (`PublicSet`), one row per "position":
  * classification: the logits of the label words' first tokens at the last prompt position,
    one row per public prompt: ``logits`` (P, labels) float16.
  * generation: the next-token logits at every position of every public prompt *after the prefix
    all public prompts share* (the chat template's system turn and the fixed part of the prompt
    template: a causal model's logits there are the same for every prompt, so they carry nothing).
    Prompt i of length n_i contributes positions ``min(c, n_i - 1) .. n_i - 1``, c being the length
    of the common prefix; the last one predicts the first response token. Rows are prompt by
    prompt, position by position. Top-k: ``ids`` (N, k) int32 and ``values`` (N, k) float16; with
    ``kd.full_logits``: ``logits`` (N, vocab) float16.
  * down (from round 2): ``probs`` float16 of the same rows, plus for top-k the ``ids`` (int32) of
    the union of the clients' top-k, padded with probability 0 to the widest row.
A client's top-k stands for ``softmax(values / T)`` over its k ids: it gives probability 0 to every
other id (the mass outside its top-k is dropped and the rest renormalized). Bytes are the exact
encoded sizes of these messages; they grow with the public set and k, not with the model.

Clients may hold a different model (``kd.client_model``) with the same tokenizer; logits are
compared over the tokenizer's ids ``0 .. len(tokenizer) - 1`` (embedding rows past it are padding).

Variants for label skew (measurements and advice in docs/kd-findings.md), each a ``kd.*`` setting that can
be set on its own (prior correction and class weighting work best together: tests/test_distill.py):
  * ``kd.mode = hybrid`` (FedDF, Lin et al. 2020): down, the global adapter instead of soft labels; a client
    starts from it (no client-side distillation), trains, and returns its logits *and* its adapter
    (tensors named `ADAPTER` + PEFT key); the server averages the adapters (`average_adapters`, FedAvg by
    examples) and distils the soft labels into that average with a fresh optimizer.
  * ``kd.vote_correction = prior``: a client sends ``logits - T log(prior)`` (`distill.prior_correct_logits`),
    its vote under a uniform label prior; the prior is its smoothed label histogram (`label_counts`).
  * ``kd.class_weighting``: the client also sends ``label_counts`` (int32, one per label) and the server takes
    each class's vote from the clients in proportion to their counts of it (`distill.aggregate_class_weighted`).
  * ``kd.sharpen``: the aggregated soft labels are raised to a power and renormalized (`distill.sharpen`).
  * ``kd.val_size > 0``: keep-best (`distil_keep_best`): the server scores the model on its own labeled
    validation rows (held back from every client, never the test set) before and during distillation and
    keeps the best adapter, so a round's distillation never ends below where it started on that split.
  * ``kd.client_accuracy_examples``: in the last round each sampled client scores its own model on (the start of)
    the test set; their mean is ``client_accuracy`` in summary.json.

Why one module of ~550 lines: the KD client, the server's round loop and the label-skew variants they
implement together (each variant has a client half and a server half); the public set, its soft labels
and the distillation steps on it are `kd_public`.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .. import distill
from ..checkpoint import ClientStore, load_optimizer_state, optimizer_state, resumes
from ..checkpoint import enabled as checkpointing
from ..data.tasks import IGNORE, Example, collate
from ..flops import FlopCache
from ..evaluate import evaluate
from ..grid import ClientApp, Grid, exchange
from ..meter import ComputeMeter
from ..models import attach_lora, load_base, load_tokenizer
from ..progress import Bars
from ..rounds import RoundLoop, ServerHooks, screen_reply
from ..train.adapter import State, adapter_state, load_adapter_state
from ..train.local_steps import (TrainSettings, batches, make_optimizer, round_rng, round_seed,
                                 settings_from)
from ..train.losses import lm_loss
from ..wire import Message, encoded_size, spec_of
from ..registry import Paradigm, register
from .kd_fast import fast_for, key_of
from .kd_public import (ADAPTER, PublicSet, SoftLabels, average_adapters, distil, distil_keep_best,  # noqa: F401
                        distill_spans, held_data, label_counts, make_public_set, step)



@dataclass
class KDConfig:
    public_source: str | None = None
    """File of public (unlabeled) prompts known to server and clients; when unset, `public_fraction` of the training rows is held back from every client and its labels dropped."""
    public_fraction: float = 0.1
    public_size: int | None = 200
    """At most this many public prompts (null: all)."""
    top_k: int = 8
    """Generation tasks: logits travel as the top-k token ids and fp16 values per position."""
    full_logits: bool = False
    """Generation tasks: send full-vocabulary logits instead of top-k (to show the cost of not compressing)."""
    temperature: float = 1.0
    """Softmax temperature of the soft labels and the distillation loss."""
    distill_steps: int = 4
    """Client steps distilling toward the server's soft labels each round (before private training)."""
    server_steps: int = 10
    """Server steps distilling the aggregated soft labels into the global model each round."""
    client_model: str | None = None
    """A different (e.g. smaller) client model with the same tokenizer; default: the server's model."""
    mode: Literal["logits", "hybrid"] = "logits"
    """`logits`: only logits travel (clients keep their own adapters). `hybrid` (FedDF, Lin et al. 2020): clients also send their adapters, the server averages them (FedAvg), distils the soft labels into the average and sends that adapter down; bytes then include the adapters. See docs/kd-findings.md."""
    vote_correction: Literal["none", "prior"] = "none"
    """Classification: `prior` makes every client divide its probabilities by its own (smoothed) label prior before they travel, so a client with skewed labels stops voting for its majority class (Selective-FD)."""
    class_weighting: bool = False
    """Classification: weight each class's votes by the clients' label counts of that class (DS-FL); clients then also send their label counts (one int32 per label)."""
    sharpen: float | None = None
    """Raise the aggregated soft labels to this power and renormalize (DS-FL's entropy reduction; 2 squares them); null: no sharpening."""
    server_lr: float | None = None
    """Learning rate of the server's distillation (default: train.lr)."""
    val_size: int = 0
    """Labeled training rows held back from every client as the server's validation split (never the test set): the server scores the global model on it during distillation and keeps the best checkpoint (keep-best, early stopping), so distillation never ends below its starting point on it. 0: no validation, the server keeps its last step."""
    val_every: int = 2
    """Keep-best: score the validation split every this many server steps."""
    patience: int | None = None
    """Keep-best: stop distilling after this many validation scores in a row without improvement (null: run all kd.server_steps)."""
    client_accuracy_examples: int = 50
    """In the last round each sampled client also scores its own model on the first this many test examples (of those the global model is scored on); their mean is `client_accuracy` in summary.json. 0: off."""

    def __post_init__(self) -> None:
        def fail(path: str, value: Any, allowed: str) -> None:
            raise ValueError(f"{path} = {value!r} is not allowed: {allowed}.")

        if self.top_k < 1:
            fail("kd.top_k", self.top_k, "a positive integer")
        for path, v in (("kd.distill_steps", self.distill_steps), ("kd.server_steps", self.server_steps)):
            if v < 0:
                fail(path, v, "an integer >= 0 (0 skips that distillation)")
        if self.public_size is not None and self.public_size < 1:
            fail("kd.public_size", self.public_size, "a positive integer or null (an empty public set leaves "
                 "nothing to distil on)")
        if not 0 < self.public_fraction < 1:
            fail("kd.public_fraction", self.public_fraction, "a number strictly between 0 and 1")
        if not self.temperature > 0:
            fail("kd.temperature", self.temperature, "a positive number")
        if self.sharpen is not None and not self.sharpen > 0:
            fail("kd.sharpen", self.sharpen, "a positive power (e.g. 2) or null; powers above 1 sharpen, below 1 smooth")
        if self.server_lr is not None and not self.server_lr > 0:
            fail("kd.server_lr", self.server_lr, "a positive number or null (null: train.lr)")
        if self.val_size < 0:
            fail("kd.val_size", self.val_size, "an integer >= 0 (0: no validation split, no keep-best)")
        if self.client_accuracy_examples < 0:
            fail("kd.client_accuracy_examples", self.client_accuracy_examples, "an integer >= 0 (0: off)")
        if self.val_every < 1:
            fail("kd.val_every", self.val_every, "a positive integer")
        if self.patience is not None and self.patience < 1:
            fail("kd.patience", self.patience, "a positive integer or null")


def validate(c) -> None:
    """Checks across sections (`Paradigm.validate`)."""
    k = c.kd
    if k.mode == "hybrid" and k.client_model not in (None, c.model.name):
        raise ValueError(f"kd.client_model = {k.client_model!r} is not allowed: the server's model (or null) when "
                         "kd.mode = 'hybrid'. Hybrid KD averages the clients' adapters into the server's model, so "
                         "they must have the same shapes.")
    if (k.vote_correction != "none" or k.class_weighting) and c.data.task != "classification":
        what = "kd.vote_correction" if k.vote_correction != "none" else "kd.class_weighting"
        value = k.vote_correction if k.vote_correction != "none" else k.class_weighting
        raise ValueError(f"{what} = {value!r} is not allowed: label priors and label counts exist for classification "
                         f"tasks only. Set {what} to its default for data.task = {c.data.task!r}.")


def public_set_from(ctx) -> PublicSet:
    k = ctx.config.kd
    return make_public_set(ctx.data.public, ctx.data.task, vocab=len(ctx.tokenizer), pad_id=ctx.pad_id,
                           top_k=k.top_k, full_logits=k.full_logits, temperature=k.temperature,
                           batch_size=ctx.config.train.batch_size, vote_correction=k.vote_correction,
                           class_weighting=k.class_weighting, sharpen=k.sharpen)


# --------------------------------------------------------------------------- client side


class KDClient(ClientApp):
    """One client: its private examples, its own adapter state (kept on the CPU between rounds), the public set.

    In simulation all clients share one `PeftModel` and swap their adapter state in and out;
    no weights ever travel. With a `ClientStore` (a checkpointed run) the client also keeps its adapter
    by round on disk, and starts round r from its latest adapter of a round before r: the same as
    `state` in a run that never stopped, and the right one when a restarted server redoes a round
    this client had already trained. Without one it starts from `state` (which Flower's runtime
    sets from the node's state before every message).
    """

    def __init__(
        self,
        node_id: int,
        model,
        examples: list[Example],
        public: PublicSet,
        settings: TrainSettings,
        init_state: State,
        *,
        distill_steps: int,
        device: torch.device,
        pad_id: int,
        seed: int,
        bars: Bars | None = None,
        store: ClientStore | None = None,
        hybrid: bool = False,
        score: Callable[[Any], float] | None = None,
    ) -> None:
        if not examples:
            raise ValueError(f"client {node_id} has no training examples")
        # Label-skew corrections (classification): the client's histogram and its smoothed prior.
        self.counts = label_counts(examples, public.width) if public.mode == "labels" else None
        self.prior = distill.label_prior(self.counts) if public.vote_correction == "prior" else None
        self.hybrid = hybrid
        self.score = score
        self.flops = FlopCache(settings.count_flops)
        # The fast path (static shapes, CUDA graphs; `kd_fast`), shared with every client and the server on this model.
        self.fast = fast_for(model, public, settings, device)
        if self.fast is not None:
            self.flops.per_key = self.fast.flop_counts
        self.node_id = node_id
        self.model = model
        self.examples = examples
        self.public = public
        self.settings = settings
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in init_state.items()}
        self.initial = self.state
        self.store = store
        self.distill_steps = distill_steps
        self.device = device
        self.pad_id = pad_id
        self.seed = seed
        self.bars = bars or Bars(quiet=True)

    def __call__(self, msg: Message) -> Message:
        rnd = int(msg.meta["round"])
        global_adapter = {k[len(ADAPTER):]: v for k, v in msg.tensors.items() if k.startswith(ADAPTER)}
        soft = {k: v for k, v in msg.tensors.items() if not k.startswith(ADAPTER)}
        labels = self.public.from_wire(soft, self.device) if soft else None
        start = self.store.before(rnd) if self.store is not None else None
        if self.store is not None:
            self.state = start[1] if start is not None else self.initial
        if global_adapter:  # hybrid: start from the server's distilled average, like a FedLLM client
            load_adapter_state(self.model, {k: v.to(self.device) for k, v in global_adapter.items()},
                               expected=set(self.state), what="global adapter")
        else:
            load_adapter_state(self.model, {k: v.to(self.device) for k, v in self.state.items()})
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = make_optimizer(params, self.settings)
        # Seeded by (run seed, round, client) so results do not depend on the order clients run in.
        rng, torch_seed = round_rng(self.seed, rnd, self.node_id)
        torch.manual_seed(torch_seed)
        k_steps = self.distill_steps if labels is not None else 0
        steps = self.settings.steps_for(len(self.examples))
        info = f"client {self.node_id}"
        self.bars.start("steps", k_steps + steps, info=info)
        # FLOPs counted once per (kind of step, batch shape) and reused: counting every step would cost more
        # than the step on a GPU. The meter times the round and takes its peak memory.
        meter = ComputeMeter(self.device, count_flops=False)
        flops = self.flops
        flops.take()
        with meter:
            kd_losses: list[float] = []
            if labels is not None:
                kd_losses = distil(self.model, opt, self.public, labels, k_steps, rng, device=self.device,
                                   max_grad_norm=self.settings.max_grad_norm, flops=flops, fast=self.fast,
                                   on_step=lambda v: self.bars.advance(
                                       "steps", info=None if v is None else f"{info} KL {v:.3f}"))
            self.model.train()
            losses, seen = self._train(params, opt, steps, rng, info)
            tensors = self.public.reply_tensors(self.model, self.device, prior=self.prior, flops=flops,
                                                fast=self.fast)
        self.model.eval()
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in adapter_state(self.model).items()}
        if self.store is not None:
            self.store.save(rnd, self.state, start)
        return Message(
            {**tensors, **self.reply_extras()},
            {
                **self.own_accuracy(bool(msg.meta.get("evaluate"))),
                "kind": "kd_res",
                "round": rnd,
                "src": self.node_id,
                "num_examples": len(self.examples),
                "examples_seen": seen,
                "steps": len(losses),
                "distill_steps": len(kd_losses),
                "distill_loss": sum(kd_losses) / len(kd_losses) if kd_losses else None,
                "train_loss": sum(losses) / len(losses),
                "train_loss_first": losses[0],
                "train_loss_last": losses[-1],
                "flops": flops.total,
                "peak_memory_bytes": meter.peak_memory_bytes,
                "seconds": meter.seconds,
            },
        )


    def _train(self, params, opt, steps: int, rng, info: str) -> tuple[list[float], int]:
        """The private training steps (FedLLM's loss); returns their losses and the examples seen.

        On the fast path the batch is right-padded (`kd_fast.KDFast.train_args`), the step replays a graph and
        the losses are read once, at the end.
        """
        losses: list = []
        seen = 0
        flops, fast = self.flops, self.fast
        for chunk in batches(self.examples, self.settings.batch_size, steps, rng):
            batch = collate(chunk, self.pad_id)
            if fast is not None:
                args = fast.train_args(batch)
                with flops.block(key_of("train", args)):
                    loss = fast.train(*args)
                    step(loss, params, opt, self.settings.max_grad_norm)
                losses.append(loss.detach().clone())
                self.bars.advance("steps")
            else:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with flops.block(("train", *batch["input_ids"].shape, int((batch["labels"][:, 1:] != IGNORE).sum()))):
                    loss, _ = lm_loss(self.model, batch)
                    step(loss, params, opt, self.settings.max_grad_norm)
                losses.append(float(loss.detach()))
                self.bars.advance("steps", info=f"{info} loss {losses[-1]:.3f}")
            seen += len(chunk)
        if fast is not None:
            losses = torch.stack(losses).tolist()
        return losses, seen

    def reply_extras(self) -> dict[str, torch.Tensor]:
        """What travels beside the logits: label counts (``kd.class_weighting``), the adapter (hybrid)."""
        out = {"label_counts": self.counts} if self.public.class_weighting else {}
        if self.hybrid:
            out.update({ADAPTER + k: v for k, v in self.state.items()})
        return out

    def own_accuracy(self, asked: bool) -> dict[str, float]:
        """``{"client_accuracy": score}`` of this client's own model (loaded now) when the server asks for it."""
        if not asked or self.score is None:
            return {}
        return {"client_accuracy": self.score(self.model)}


# --------------------------------------------------------------------------- server side


def serve(
    grid: Grid,
    public: PublicSet,
    model,
    global_state: State,
    settings: TrainSettings,
    *,
    server_steps: int,
    rounds: int,
    clients_per_round: int,
    seed: int,
    eval_every: int,
    device: torch.device,
    hooks: ServerHooks,
    min_replies: int = 1,
    hybrid: bool = False,
    val_score: Callable[[], float] | None = None,
    val_every: int = 2,
    patience: int | None = None,
    client_accuracy: bool = False,
) -> tuple[State, list[dict[str, Any]]]:
    """Run the KD-FedLLM round loop and return the final global adapter state and the evaluations.

    Args:
        grid: Where the clients are.
        public: The public set and what travels on it.
        model: The server's model; its adapter is the global one (loaded from `global_state` when used).
        global_state: The initial global adapter state.
        settings: Optimizer settings of the server's distillation (lr, optimizer, clipping, FLOP counting).
        server_steps: Distillation steps into the global adapter per round.
        rounds: Number of rounds.
        clients_per_round: Clients sampled (uniformly, seeded) each round.
        seed: Seed of the client sampling and of the server's batches.
        eval_every: Evaluate every N rounds, and after the last.
        device: Where the server computes.
        hooks: Evaluation, logging, checkpointing and progress.
        min_replies: Fewer valid replies than this keep the previous soft labels and skip the server's distillation.
        hybrid: FedDF: clients also return their adapters; the server starts each round's distillation from their
            example-weighted mean (with a fresh optimizer) and sends the result down instead of soft labels.
        val_score: Scores ``model`` as loaded on the server's validation split: distillation keeps the best
            adapter (`distil_keep_best`); None: it keeps the last.
        val_every: Keep-best: steps between validation scores.
        patience: Keep-best: early stopping after this many scores without improvement.
        client_accuracy: Ask the last round's clients to score their own models (``client_accuracy``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, settings)  # the server trains one adapter all run long: its optimizer persists
    labels: SoftLabels | None = None
    loop = RoundLoop(hooks, "KD-FedLLM", nodes=grid.node_ids(), rounds=rounds, clients_per_round=clients_per_round,
                     seed=seed, eval_every=eval_every)
    saved = loop.resume({"global": spec_of(global_state)}, device=device)
    if saved is not None:
        global_state = saved.tensors["global"]
        load_optimizer_state(opt, saved.tensors.get("optimizer", {}), saved.meta["optimizer"])
        labels = saved.tensors.get("labels")

    # The server's FLOPs: each distillation batch shape counted once, and one pass over the validation split.
    server_flops = FlopCache(settings.count_flops)
    fast = fast_for(model, public, settings, device)  # the clients' fast path (same model in a simulation)
    if fast is not None:
        server_flops.per_key = fast.flop_counts

    def counted_score() -> float:
        with server_flops.block(("validation score",)):
            return val_score()

    def checkpoint():
        opt_tensors, opt_meta = optimizer_state(opt)
        tensors = {"global": global_state, "optimizer": opt_tensors}
        if labels is not None:
            tensors["labels"] = {k: v.to("cpu") for k, v in labels.items()}
        return tensors, {"optimizer": opt_meta}

    for rnd, chosen in loop:
        if hybrid:
            down_tensors = {ADAPTER + k: v for k, v in global_state.items()}
        else:
            down_tensors = public.to_wire(labels) if labels is not None else {}
        meta = {"kind": "kd_ins", "round": rnd, **({"evaluate": True} if client_accuracy and rnd == rounds else {})}
        messages = [Message(down_tensors, {**meta, "dst": n}) for n in chosen]
        down = [encoded_size(m) for m in messages]
        replies = exchange(grid, messages, lambda n: hooks.bars.advance("clients", by=n))
        updates = []
        extra = {ADAPTER + k: spec for k, spec in spec_of(global_state).items()} if hybrid else None
        for node, msg_bytes, reply in zip(chosen, down, replies):
            fields, update = screen_reply(reply, lambda r: public.check_reply(r, extra))
            if "client_accuracy" in reply.meta and fields["status"] == "ok":
                fields["client_accuracy"] = float(reply.meta["client_accuracy"])
            hooks.log({"type": "client", "round": rnd, "client": node, "bytes_down": msg_bytes,
                       "bytes_up": encoded_size(reply), **fields})
            if update is not None:
                updates.append(update)

        aggregated = len(updates) >= min_replies
        kd_losses: list[float] = []
        kept: dict[str, Any] = {}
        meter = ComputeMeter(device, count_flops=False)
        with meter:
            if aggregated:
                logits = [({k: v for k, v in t.items() if not k.startswith(ADAPTER)}, n) for t, n in updates]
                labels = public.soft_labels(logits, device)
                if hybrid:
                    global_state, opt = average_adapters(updates, model, settings)
                load_adapter_state(model, global_state)
                rng = random.Random(round_seed(seed, rnd, -1))
                # Torch seeded per round too (LoRA dropout), so a restarted server draws the same masks.
                torch.manual_seed(round_seed(seed, rnd, -1))
                if val_score is None:
                    kd_losses = distil(model, opt, public, labels, server_steps, rng, device=device,
                                       max_grad_norm=settings.max_grad_norm, flops=server_flops, fast=fast)
                else:
                    kd_losses, kept = distil_keep_best(model, opt, public, labels, server_steps, rng, device=device,
                                                       max_grad_norm=settings.max_grad_norm, score=counted_score,
                                                       every=val_every, patience=patience, flops=server_flops,
                                                       fast=fast)
                model.eval()
                global_state = adapter_state(model)
        hooks.log({"type": "server", "round": rnd, "flops": server_flops.take(), "seconds": meter.seconds,
                   "peak_memory_bytes": meter.peak_memory_bytes, "steps": len(kd_losses),
                   "distill_loss": sum(kd_losses) / len(kd_losses) if kd_losses else None, **kept})
        loop.end(rnd, global_state, replies=len(updates), sampled=len(chosen), aggregated=aggregated,
                 checkpoint=checkpoint)
    return global_state, loop.evaluations


# --------------------------------------------------------------------------- wiring

def client_model(ctx):
    """The model the clients train: ``ctx.model``, or ``kd.client_model`` with a fresh LoRA when it is another model.

    A separate client model belongs to the run: ``ctx`` owns it and unloads it when the run's context closes
    (on every runtime: the experiment, a Flower node, a distributed rank), leaving the cached base clean.
    """
    c = ctx.config
    name = c.kd.client_model
    if name is None or name == c.model.name:
        return ctx.model
    return ctx.owned("kd.client_model", lambda: _load_client_model(ctx, name), lambda model: model.unload())


def _load_client_model(ctx, name: str):
    c = ctx.config
    try:
        tokenizer = load_tokenizer(name)
    except (OSError, ValueError) as err:
        raise ValueError(f"kd.client_model = {name!r}: its tokenizer could not be loaded: {err}") from None
    ours, theirs = ctx.tokenizer.get_vocab(), tokenizer.get_vocab()
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise ValueError(
            f"kd.client_model = {name!r} has a different tokenizer from model.name = {c.model.name!r} "
            f"({len(theirs)} vs {len(ours)} tokens; e.g. {differ}): KD exchanges logits indexed by token id, so "
            "clients need a model with the same vocabulary. Choose a client model of the same family, or unset "
            "kd.client_model."
        )
    try:
        base, _ = load_base(name, dtype=c.model.dtype, device=ctx.device,
                            attn_implementation=c.model.attn_implementation)
    except ValueError as err:
        raise ValueError(f"kd.client_model = {name!r} could not be loaded: {err}") from None
    if base.get_output_embeddings().weight.shape[0] < len(ctx.tokenizer):
        raise ValueError(f"kd.client_model = {name!r} has fewer output logits than its tokenizer has tokens.")
    return attach_lora(base, c.peft, c.seed)


def client_store_dir(ctx) -> Path | None:
    """Where the clients of a checkpointed run keep their adapters by round: ``<run>/kd-clients``.

    None when the run does not checkpoint, or the context has no run folder (a Flower node, a worker
    rank started without ``--out``: ``ctx.path`` is ``.``); such clients keep their adapter in `KDClient.state`.
    A run that starts afresh (no server checkpoint to resume from) empties the folder first, so no
    client resumes an adapter of an earlier run.
    """
    if not checkpointing(ctx.config) or ctx.path == Path("."):
        return None
    folder = ctx.path / "kd-clients"
    if not resumes(ctx.path, ctx.config):
        shutil.rmtree(folder, ignore_errors=True)
    return folder


def make_clients(ctx) -> dict[int, KDClient]:
    """One client app per partition, each starting from the same fresh adapter of the client model."""
    public = public_set_from(ctx)
    model = client_model(ctx)
    init, settings, steps = adapter_state(model), settings_from(ctx.config), ctx.config.kd.distill_steps
    stores = client_store_dir(ctx)
    score = client_scorer(ctx)
    return {
        i: KDClient(i, model, ctx.client_examples(i), public, settings, init, distill_steps=steps,
                    device=ctx.device, pad_id=ctx.pad_id, seed=ctx.config.seed, bars=ctx.bars,
                    store=ClientStore(stores / f"client-{i}.safetensors", ctx.config) if stores else None,
                    hybrid=ctx.config.kd.mode == "hybrid", score=score)
        for i in range(len(ctx.data.parts))
    }


def client_scorer(ctx) -> Callable[[Any], float] | None:
    """Scores a client's model on the first ``kd.client_accuracy_examples`` of the global model's test examples.

    None when that is 0 or there are none.
    """
    test = ctx.data.test[: ctx.config.eval.max_examples][: ctx.config.kd.client_accuracy_examples]
    if not test:
        return None
    e = ctx.config.eval
    return lambda model: evaluate(model, ctx.data.task, test, batch_size=e.batch_size, device=ctx.device,
                                  pad_id=ctx.pad_id)


def server_val_scorer(ctx) -> Callable[[], float] | None:
    """Scores ``ctx.model`` on the server's validation split (``kd.val_size`` labeled rows); None when there is none."""
    val = ctx.data.extras.get("server_val", [])
    if not val:
        return None
    e = ctx.config.eval
    return lambda: evaluate(ctx.model, ctx.data.task, val, batch_size=e.batch_size, device=ctx.device,
                            pad_id=ctx.pad_id)


def run_server(ctx, grid: Grid) -> list[dict[str, Any]]:
    """The server side of a whole run; leaves the final global adapter in ``ctx.model`` and on disk."""
    c, f, k = ctx.config, ctx.config.federation, ctx.config.kd
    settings = settings_from(c)
    if k.server_lr is not None:
        settings.lr = k.server_lr
    final, evaluations = serve(
        grid, public_set_from(ctx), ctx.model, adapter_state(ctx.model), settings,
        server_steps=k.server_steps, rounds=f.rounds, clients_per_round=f.clients_per_round, seed=c.seed,
        eval_every=c.eval.every, device=ctx.device, hooks=ServerHooks.for_model(ctx), min_replies=f.min_replies,
        hybrid=k.mode == "hybrid", val_score=server_val_scorer(ctx), val_every=k.val_every, patience=k.patience,
        client_accuracy=k.client_accuracy_examples > 0,
    )
    load_adapter_state(ctx.model, final)
    return evaluations


def _needs(config, runtime: str) -> str | None:
    if runtime == "flower-data-path" and not config.kd.public_source:
        return ("a KD client with its own data-path needs the public prompts as a file: set kd.public_source in the "
                "experiment config (kd.public_fraction takes them from the server's training data, which this "
                "client does not have).")
    return None


register(Paradigm(
    "kd", "KD-FedLLM", "clients share logits on a public set of prompts; the server distils them into the global "
    "model", make_clients, run_server, section=("kd", KDConfig), validate=validate, stateful_clients=True,
    held_data=held_data,
    strategy_label="kd (weighted mean of probabilities)", needs=_needs,
))
