"""Offsite-tuning: clients train adapters on an emulator, never on the model (Xiao et al., 2023).

The model owner (the server) builds an *emulator* of its model (`build_emulator`): the bottom
``offsite.bottom`` and top ``offsite.top`` blocks, where the adapters live, and between them the middle
blocks compressed by uniform layer drop (``offsite.middle`` of them kept, evenly spaced), frozen; the
embeddings, the final norm and the head are kept. LoRA (``peft.*``) sits on the adapter blocks only.
Round r, as the server sees it (`serve`):
  1. sample clients; send each the global adapter, plus, the first time a client is sampled, the
     emulator itself (its frozen weights and configuration: ``offsite_ins`` with ``emulator.*`` tensors);
  2. the client builds the emulator from that message once (`emulator_from_message`) and keeps it, then
     trains the adapter on it for ``train.local_steps`` steps with backpropagation, exactly as a FedLLM
     client trains on the full model (`fedtune.paradigms.fedpeft.FedPeftClient`), and replies with it;
  3. the server averages the adapters (``federation.strategy``) and *plugs them in*: the emulator's
     adapter blocks are blocks of the full model (renamed by `to_full`), so the full model with the
     averaged adapter is the global model; the full model never leaves the server. Every k rounds it
     scores the plug-in full model (the run's accuracy) and the emulator with the same adapter
     (``emulator_accuracy`` in summary.json).

The emulator's bytes are the exact encoded size of the message that carries it, counted once per
client (in the round it is first sampled). A client's memory and compute are those of the emulator:
``client_weights_bytes`` says how many bytes of weights it holds. In simulation the clients share one
emulator built from the first such message (as FedLLM's clients share one base), and the process holds
the full model too, so the measured peak (process RSS on a CPU) includes it; docs/paradigms-beyond-backprop.md
measures a client alone. Not checkpointed (a restarted server starts over).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from ..evaluate import evaluate
from ..grid import ClientApp, Grid, exchange
from ..registry import Paradigm, register
from ..rounds import RoundLoop, ServerHooks, aggregate, screen_reply
from ..strategies import make_strategy
from ..train.adapter import State, adapter_state, load_adapter_state
from ..train.local_steps import settings_from
from ..train.step_runner import make_runner
from ..wire import Message, WireError, check, encoded_size, spec_of
from .fedpeft import FedPeftClient

PREFIX = "emulator."
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class OffsiteConfig:
    bottom: int = 2
    """Blocks at the bottom of the model that carry adapters and are trained (e.g. 2 of SmolLM2's 30)."""
    top: int = 2
    """Blocks at the top of the model that carry adapters and are trained."""
    middle: int | None = None
    """Middle blocks the emulator keeps by uniform layer drop, frozen (null: a quarter of them, at least 1)."""
    distill_steps: int = 0
    """Steps the model owner distils the kept middle blocks to mimic the full middle before sending the emulator (0: plain layer drop)."""
    distill_lr: float = 1e-4
    """AdamW learning rate of the distillation."""
    distill_samples: int = 64
    """Public text rows the distillation trains on: continuations the full model samples from the start of ``data.prompt``."""
    distill_length: int = 64
    """Tokens per distillation row."""
    distill_batch_size: int = 8
    """Rows per distillation step."""

    def __post_init__(self) -> None:
        for name in ("bottom", "top"):
            if getattr(self, name) < 1:
                raise ValueError(f"offsite.{name} = {getattr(self, name)!r} is not allowed: a positive integer "
                                 "(the adapter blocks).")
        for name in ("distill_steps",):
            if getattr(self, name) < 0:
                raise ValueError(f"offsite.{name} = {getattr(self, name)!r} is not allowed: 0 (no distillation) or "
                                 "a positive integer.")
        for name in ("distill_samples", "distill_length", "distill_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"offsite.{name} = {getattr(self, name)!r} is not allowed: a positive integer.")
        if not self.distill_lr > 0:
            raise ValueError(f"offsite.distill_lr = {self.distill_lr!r} is not allowed: a positive number.")
        if self.middle is not None and self.middle < 1:
            raise ValueError(f"offsite.middle = {self.middle!r} is not allowed: a positive integer, or null for a "
                             "quarter of the middle blocks.")


# --------------------------------------------------------------------------- the emulator


def layer_plan(num_layers: int, bottom: int, top: int, middle: int | None) -> list[int]:
    """The full model's block indices the emulator keeps, in order: bottom, evenly spaced middle, top."""
    if bottom + top > num_layers:
        raise ValueError(f"offsite.bottom + offsite.top = {bottom + top} is more than the model's {num_layers} "
                         "blocks: lower them.")
    mid = list(range(bottom, num_layers - top))
    # No middle at all (a 2-block test model with 1 + 1 adapter blocks): the emulator is the whole model.
    keep = (max(1, len(mid) // 4) if mid else 0) if middle is None else middle
    if keep > len(mid):
        raise ValueError(f"offsite.middle = {keep} is more than the {len(mid)} middle blocks: lower it.")
    kept = [mid[(i * len(mid)) // keep] for i in range(keep)]
    return list(range(bottom)) + kept + list(range(num_layers - top, num_layers))


def adapter_layers(plan: list[int], bottom: int, top: int) -> list[int]:
    """The emulator's block indices that carry adapters."""
    return list(range(bottom)) + list(range(len(plan) - top, len(plan)))


def _rename(key: str, mapping: dict[int, int]) -> str | None:
    m = _LAYER.search(key)
    if m is None:
        return key
    i = int(m.group(1))
    return None if i not in mapping else key[: m.start()] + f".layers.{mapping[i]}." + key[m.end():]


def to_full(state: State, plan: list[int]) -> State:
    """An emulator adapter state under the full model's names (emulator block j is block plan[j])."""
    mapping = dict(enumerate(plan))
    return {_rename(k, mapping): v for k, v in state.items()}


def to_emulator(state: State, plan: list[int], layers: list[int]) -> State:
    """The part of a full-model adapter state on the emulator's adapter blocks, under the emulator's names."""
    mapping = {plan[j]: j for j in layers}
    out = {}
    for k, v in state.items():
        name = _rename(k, mapping)
        if name is not None and _LAYER.search(k):
            out[name] = v
    return out


def base_weights(model) -> State:
    """The frozen base weights of a (LoRA-wrapped) model under the plain model's names; no adapter entries."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for k, v in inner.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def build_emulator(model, plan: list[int]) -> tuple[Any, State]:
    """(the emulator's plain model config, its frozen weights): `model`'s blocks `plan`, everything else kept."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(inner.config)
    config.num_hidden_layers = len(plan)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in plan]
    mapping = {i: j for j, i in enumerate(plan)}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    weights = {}
    for k, v in base_weights(model).items():
        name = _rename(k, mapping)
        if name is None or (tied and name == "lm_head.weight"):
            continue
        weights[name] = v.detach().clone()
    return config, weights


def lora_for(peft, layers: list[int]) -> LoraConfig:
    return LoraConfig(r=peft["r"], lora_alpha=peft["alpha"], lora_dropout=peft["dropout"],
                      target_modules=list(peft["target_modules"]), layers_to_transform=list(layers),
                      layers_pattern="layers", task_type="CAUSAL_LM")


def emulator_model(config_json: str, weights: State, peft: dict[str, Any], layers: list[int],
                   device: torch.device, seed: int = 0):
    """The emulator as a frozen model with LoRA on its adapter blocks, from its config (JSON) and weights."""
    model = plain_emulator(config_json, weights, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, lora_for(peft, layers))


def plain_emulator(config_json: str, weights: State, device: torch.device):
    """The emulator as a frozen plain causal LM (no adapter), from its config (JSON) and weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = json.loads(config_json)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config)  # initialised, then overwritten by the weights
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if set(weights) != expected:
        raise WireError(f"emulator weights do not match its config: missing {sorted(expected - set(weights))[:3]}, "
                        f"unexpected {sorted(set(weights) - expected)[:3]}")
    model.load_state_dict(weights, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def emulator_message_parts(config, weights: State, plan: list[int], layers: list[int], peft: dict) -> tuple[State, dict]:
    """The tensors (``emulator.*``) and meta that carry an emulator to a client."""
    meta = {"config": config.to_json_string(use_diff=False), "plan": plan, "adapter_layers": layers, "peft": peft}
    digest = hashlib.sha256(repr(sorted((k, tuple(v.shape)) for k, v in weights.items())).encode())
    digest.update(repr(meta).encode())
    meta["id"] = digest.hexdigest()[:16]
    return {PREFIX + k: v for k, v in weights.items()}, meta


def weight_bytes(model) -> int:
    """Bytes of every distinct parameter and buffer of `model` (tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------- client side


class OffsiteClient(ClientApp):
    """One client: its private examples and the emulator it was sent (kept between rounds).

    ``shared`` is a dict the clients of one process share: the emulator built from the first message
    that carried it, and its step runner (in simulation one emulator serves all, as one base does).
    """

    def __init__(self, node_id: int, examples, settings, *, device, pad_id: int, seed: int, shared: dict,
                 bars=None) -> None:
        self.node_id, self.examples, self.settings = node_id, examples, settings
        self.device, self.pad_id, self.seed, self.shared, self.bars = device, pad_id, seed, shared, bars
        self.emulator_id: str | None = None
        self._inner: FedPeftClient | None = None

    def _receive(self, msg: Message) -> None:
        meta = msg.meta["emulator"]
        if self.shared.get("id") != meta["id"]:
            weights = {k[len(PREFIX):]: v for k, v in msg.tensors.items() if k.startswith(PREFIX)}
            model = emulator_model(meta["config"], weights, meta["peft"], meta["adapter_layers"], self.device)
            self.shared.update(id=meta["id"], model=model, bytes=weight_bytes(model),
                               runner=make_runner(model, self.settings, device=self.device, pad_id=self.pad_id))
        self.emulator_id = meta["id"]

    def __call__(self, msg: Message) -> Message:
        if msg.kind != "offsite_ins":
            raise ValueError(f"client {self.node_id} cannot handle a {msg.kind!r} message")
        if "emulator" in msg.meta:
            self._receive(msg)
        if self.emulator_id is None or self.shared.get("id") != self.emulator_id:
            raise ValueError(f"client {self.node_id} has no emulator: the server must send it first")
        if self._inner is None:
            self._inner = FedPeftClient(self.node_id, self.shared["model"], self.examples, self.settings,
                                        device=self.device, pad_id=self.pad_id, seed=self.seed, bars=self.bars,
                                        runner=self.shared["runner"])
        adapter = {k: v for k, v in msg.tensors.items() if not k.startswith(PREFIX)}
        reply = self._inner(Message(adapter, {**msg.meta, "kind": "fit_ins"}))
        reply.meta.update(kind="offsite_res", client_weights_bytes=self.shared["bytes"])
        return reply


# --------------------------------------------------------------------------- server side


def serve(grid: Grid, global_state: State, strategy, emulator: tuple[State, dict], *, rounds: int,
          clients_per_round: int, seed: int, eval_every: int, hooks: ServerHooks, min_replies: int = 1
          ) -> tuple[State, list[dict[str, Any]]]:
    """Run the offsite-tuning round loop; returns the final emulator adapter state and the evaluations."""
    expect = spec_of(global_state)
    emu_tensors, emu_meta = emulator
    has_emulator: set[int] = set()
    loop = RoundLoop(hooks, "Offsite-tuning", nodes=grid.node_ids(), rounds=rounds,
                     clients_per_round=clients_per_round, seed=seed, eval_every=eval_every)
    for rnd, chosen in loop:
        messages = []
        for n in chosen:
            first = n not in has_emulator
            tensors = {**global_state, **emu_tensors} if first else global_state
            meta = {"kind": "offsite_ins", "round": rnd, "dst": n, **({"emulator": emu_meta} if first else {})}
            messages.append(Message(tensors, meta))
        down = [encoded_size(m) for m in messages]
        updates = []
        replies = exchange(grid, messages, lambda k: hooks.bars.advance("clients", by=k))
        for node, msg, msg_bytes, reply in zip(chosen, messages, down, replies):
            fields, update = screen_reply(reply, lambda r: check(r, expect))
            record = {"type": "client", "round": rnd, "client": node, "bytes_down": msg_bytes,
                      "bytes_up": encoded_size(reply), **fields}
            if "emulator" in msg.meta:
                record["emulator_bytes"] = msg_bytes - encoded_size(Message(global_state, {
                    k: v for k, v in msg.meta.items() if k != "emulator"}))
            if "client_weights_bytes" in reply.meta:
                record["client_weights_bytes"] = reply.meta["client_weights_bytes"]
            hooks.log(record)
            if fields["status"] == "ok":
                has_emulator.add(node)
            elif "emulator" not in msg.meta:
                has_emulator.discard(node)  # a client that lost its emulator gets it again
            if update is not None:
                updates.append(update)
        global_state, aggregated, note = aggregate(strategy, global_state, updates, min_replies=min_replies,
                                                   privacy=hooks.privacy)
        loop.end(rnd, global_state, replies=len(updates), sampled=len(chosen), aggregated=aggregated, note=note)
    return global_state, loop.evaluations


def _peft_dict(p) -> dict[str, Any]:
    return {"r": p.r, "alpha": p.alpha, "dropout": p.dropout, "target_modules": list(p.target_modules)}


def make_clients(ctx) -> dict[int, OffsiteClient]:
    settings, shared = settings_from(ctx.config), {}
    return {i: OffsiteClient(i, ctx.client_examples(i), settings, device=ctx.device, pad_id=ctx.pad_id,
                             seed=ctx.config.seed, shared=shared, bars=ctx.bars) for i in range(len(ctx.data.parts))}


def run_server(ctx, grid: Grid) -> list[dict[str, Any]]:
    """Build the emulator, run the rounds, leave the plug-in full adapter in ``ctx.model`` and on disk."""
    c, f, o = ctx.config, ctx.config.federation, ctx.config.offsite
    plan = layer_plan(ctx.model.get_base_model().config.num_hidden_layers, o.bottom, o.top, o.middle)
    layers = adapter_layers(plan, o.bottom, o.top)
    config, weights = build_emulator(ctx.model, plan)
    if o.distill_steps:
        weights = distil(ctx, config, weights, plan)
    peft = _peft_dict(c.peft)
    emulator = emulator_model(config.to_json_string(use_diff=False), weights, peft, layers, ctx.device)
    full0 = adapter_state(ctx.model)
    start = to_emulator(full0, plan, layers)
    load_adapter_state(emulator, start)  # the emulator's keys are exactly those of the adapter blocks

    def plug(state: State) -> None:
        load_adapter_state(ctx.model, {**full0, **to_full(state, plan)})

    full = ServerHooks.for_model(ctx, load=plug)
    evaluated = {"round": 0}

    def score(state: State) -> float:
        accuracy = full.evaluate(state)
        load_adapter_state(emulator, state)
        evaluated["round"] += 1
        ctx.log({"type": "paradigm", "emulator_accuracy": evaluate(
            emulator, ctx.data.task, ctx.data.test[: c.eval.max_examples], batch_size=c.eval.batch_size,
            device=ctx.device, pad_id=ctx.pad_id), "emulator_layers": plan,
            "emulator_weights_bytes": weight_bytes(emulator)})
        return accuracy

    hooks = ServerHooks(evaluate=score, log=full.log, save=full.save, bars=full.bars, privacy=full.privacy,
                        extras=full.extras)
    final, evaluations = serve(grid, start, make_strategy(f.strategy, f.server_lr, f.server_momentum),
                               emulator_message_parts(config, weights, plan, layers, peft), rounds=f.rounds,
                               clients_per_round=f.clients_per_round, seed=c.seed, eval_every=c.eval.every,
                               hooks=hooks, min_replies=f.min_replies)
    plug(final)
    return evaluations


def middle_blocks(plan: list[int], bottom: int, top: int, steps: int) -> list[int]:
    """The emulator's middle block indices, which distillation trains; a clear error when there are none."""
    middle = list(range(bottom, len(plan) - top))
    if not middle:
        raise ValueError(f"offsite.distill_steps = {steps} needs middle blocks to distil, and the emulator of this "
                         f"{len(plan)}-block model with offsite.bottom = {bottom} and offsite.top = {top} has none: "
                         "set offsite.distill_steps=0 or lower bottom/top.")
    return middle


def distil(ctx, config, weights: State, plan: list[int]) -> State:
    """The emulator's weights with its kept middle blocks distilled (`offsite_distill`); logs the cost."""
    from .offsite_distill import distil_middle, distill_text, prompt_prefix, weights_of

    c, o = ctx.config, ctx.config.offsite
    held = max(1, o.distill_samples // 4)
    ids = distill_text(ctx.model, ctx.tokenizer, prompt_prefix(c.data.prompt), o.distill_samples + held,
                       o.distill_length, c.seed + 3, ctx.device, batch_size=max(o.distill_batch_size, 16))
    student = plain_emulator(config.to_json_string(use_diff=False), weights, ctx.device)
    middle = middle_blocks(plan, o.bottom, o.top, o.distill_steps)
    got = distil_middle(ctx.model, student, middle=middle, teacher_index=plan[-o.top], student_index=len(plan) - o.top,
                        train_ids=ids[:o.distill_samples], held_ids=ids[o.distill_samples:], steps=o.distill_steps,
                        lr=o.distill_lr, batch_size=o.distill_batch_size, seed=c.seed, device=ctx.device,
                        count_flops=c.train.count_flops)
    ctx.log({"type": "server", "round": 0, "what": "emulator distillation", "flops": got["flops"],
             "seconds": got["seconds"]})
    ctx.log({"type": "paradigm", "distill_steps": o.distill_steps, "distill_seconds": got["seconds"],
             "distill_flops": got["flops"], "distill_mse_before": got["mse_before"],
             "distill_mse_after": got["mse_after"], "distill_loss_first": got["losses"][0],
             "distill_loss_last": got["losses"][-1]})
    return weights_of(student, weights)


def _validate(config) -> None:
    if config.runtime.batch_clients > 1:
        raise ValueError("federation.paradigm = 'offsite' trains clients one after another: set runtime.batch_clients=1.")
    if config.peft.method != "lora" or config.model.quantization != "none":
        raise ValueError(f"federation.paradigm = 'offsite' builds its emulator from float weights with plain LoRA: "
                         f"peft.method = {config.peft.method!r}, model.quantization = {config.model.quantization!r} "
                         "are not supported; set peft.method=lora and model.quantization=none.")


register(Paradigm(
    "offsite", "Offsite-tuning", "clients train adapters on an emulator (adapter blocks + a layer-dropped "
    "middle), the server plugs the average into the full model", make_clients, run_server, access="gray",
    backprop=True, section=("offsite", OffsiteConfig), validate=_validate, stateful_clients=True,
    checkpoints=lambda config: False, strategy_label=None, averages_updates=True,
))
