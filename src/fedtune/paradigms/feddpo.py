"""Federated DPO (``federation.paradigm: feddpo``): clients hold preference pairs and train their LoRA with
the DPO loss (`fedtune.dpo`); the server averages the adapters exactly as FedLLM does (`fedpeft.serve`).

Each client's pairs are (prompt, chosen, rejected) of the ``client`` split of HH-RLHF harmless-base
(``dpo.source``, split by ``safety.split_seed``: `fedtune.safety.hh_splits`), dealt round-robin so that no
two clients share a pair, ``dpo.pairs_per_client`` each. The reference model is the frozen base: the same
model with its adapter disabled, so no second copy is held. The benign task of ``data.*`` is only scored
(with the AdvBench harmless rate when ``safety.eval`` is on); no client trains on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import cai
from ..data.tasks import Example
from ..dpo import dpo_loss, pair_logps
from ..grid import ClientApp, Grid
from ..meter import ComputeMeter
from ..registry import Paradigm, register
from ..rounds import ServerHooks
from ..safety import hh_splits
from ..safety_eval import chat_ids
from ..strategies import aggregator_of, make_strategy
from ..train.adapter import adapter_state, load_adapter_state
from ..train.local_steps import TrainSettings, batches, make_optimizer, round_rng, settings_from
from ..wire import Message, meta_number
from .fedpeft import serve


@dataclass
class DpoConfig:
    source: str | None = None
    """HH-RLHF harmless-base file of the clients' preference pairs (null: safety.harmful_source)."""
    pairs_per_client: int = 32
    """Preference pairs each client holds (from the client split, no pair on two clients)."""
    beta: float = 0.1
    """DPO's beta: how far the policy may move from the reference (the base model)."""


@dataclass
class PreferencePair:
    chosen: Example
    rejected: Example


def encode_pairs(tokenizer, dialogues, *, system_prompt: str | None, use_chat_template: bool, max_length: int
                 ) -> list[PreferencePair]:
    """Each dialogue's (prompt, chosen, rejected) as two examples sharing the prompt's ids."""
    out = []
    for d in dialogues:
        prompt = chat_ids(tokenizer, d.prompt, system_prompt=system_prompt, use_chat_template=use_chat_template)
        pair = []
        for reply in (d.chosen, d.rejected):
            target = (tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            target = target[: max_length // 2]
            pair.append(Example(prompt[-(max_length - len(target)):], target))
        out.append(PreferencePair(*pair))
    return out


class FedDpoClient(ClientApp):
    """One client: its preference pairs, trained with DPO against the base (the adapter disabled)."""

    def __init__(self, node_id: int, model, pairs: list[PreferencePair], settings: TrainSettings, *, beta: float,
                 device: torch.device, pad_id: int, seed: int) -> None:
        if not pairs:
            raise ValueError(f"client {node_id} has no preference pairs")
        self.node_id, self.model, self.pairs, self.settings = node_id, model, pairs, settings
        self.beta, self.device, self.pad_id, self.seed = beta, device, pad_id, seed

    def __call__(self, msg: Message) -> Message:
        rnd = int(meta_number(msg, "round", integer=True))
        load_adapter_state(self.model, msg.tensors)
        rng, torch_seed = round_rng(self.seed, rnd, self.node_id)
        torch.manual_seed(torch_seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = make_optimizer(params, self.settings)
        steps = self.settings.steps_for(len(self.pairs))
        self.model.train()
        losses, margins = [], []
        meter = ComputeMeter(self.device, count_flops=self.settings.count_flops)
        with meter:
            for chunk in batches(self.pairs, self.settings.batch_size, steps, rng):
                chosen, rejected = [p.chosen for p in chunk], [p.rejected for p in chunk]
                with torch.no_grad(), self.model.disable_adapter():
                    ref_c, ref_r = pair_logps(self.model, chosen, rejected, self.pad_id, self.device)
                pol_c, pol_r = pair_logps(self.model, chosen, rejected, self.pad_id, self.device)
                loss, rc, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, self.beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.settings.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
                opt.step()
                losses.append(float(loss.detach()))
                margins.append(float((rc - rr).mean()))
        return Message(adapter_state(self.model), {
            "kind": "fit_res", "round": rnd, "src": self.node_id, "num_examples": len(self.pairs),
            "examples_seen": steps * self.settings.batch_size, "steps": len(losses),
            "train_loss": sum(losses) / len(losses), "train_loss_first": losses[0], "train_loss_last": losses[-1],
            "flops": meter.flops if self.settings.count_flops else None,
            "peak_memory_bytes": meter.peak_memory_bytes, "seconds": meter.seconds,
        })


def client_pairs(ctx) -> list[list[PreferencePair]]:
    """Every client's pairs: the client split dealt round-robin, ``dpo.pairs_per_client`` each."""
    c = ctx.config
    source = c.dpo.source or c.safety.harmful_source
    pool = hh_splits(source, c.safety.split_seed)["client"]
    n = c.federation.num_clients
    need = n * c.dpo.pairs_per_client
    if need > len(pool):
        raise ValueError(f"dpo.pairs_per_client = {c.dpo.pairs_per_client}: {n} clients need {need} pairs, the client "
                         f"split of {source} has {len(pool)}; lower it.")
    encoded = encode_pairs(ctx.tokenizer, pool[:need], system_prompt=c.data.system_prompt,
                           use_chat_template=c.data.use_chat_template, max_length=c.data.max_length)
    return [encoded[i::n] for i in range(n)]


def make_clients(ctx) -> dict[int, FedDpoClient]:
    settings = settings_from(ctx.config)
    return {i: FedDpoClient(i, ctx.model, pairs, settings, beta=ctx.config.dpo.beta, device=ctx.device,
                            pad_id=ctx.pad_id, seed=ctx.config.seed)
            for i, pairs in enumerate(client_pairs(ctx))}


def run_server(ctx, grid: Grid) -> list[dict[str, Any]]:
    f = ctx.config.federation
    final, evaluations = serve(
        grid, adapter_state(ctx.model), make_strategy(f.strategy, f.server_lr, f.server_momentum, aggregator_of(f)),
        rounds=f.rounds, clients_per_round=f.clients_per_round, seed=ctx.config.seed, eval_every=ctx.config.eval.every,
        hooks=ServerHooks.for_model(ctx), min_replies=f.min_replies, after_aggregate=cai.step_for(ctx))
    load_adapter_state(ctx.model, final)
    return evaluations


run_server.runs_cai = True  # safety.cai (fedtune.cai)


def _validate(c) -> None:
    if c.dpo.pairs_per_client < 1:
        raise ValueError(f"dpo.pairs_per_client = {c.dpo.pairs_per_client!r} is not allowed: a positive integer.")
    if not c.dpo.beta > 0:
        raise ValueError(f"dpo.beta = {c.dpo.beta!r} is not allowed: a positive number (0.1 is usual).")
    if c.federation.paradigm == "feddpo" and not (c.dpo.source or c.safety.harmful_source):
        raise ValueError("federation.paradigm = 'feddpo' needs dpo.source (or safety.harmful_source): the HH-RLHF "
                         "file of the clients' preference pairs.")


def _needs(config, runtime: str) -> str | None:
    return None if runtime == "local" else (f"federation.paradigm = 'feddpo' runs on the local runtime only, not "
                                            f"{runtime}; run it with `fedtune run`.")


register(Paradigm("feddpo", "FedDPO", "clients train LoRA with the DPO loss on their preference pairs (the base "
                  "as reference); the server averages", make_clients, run_server, section=("dpo", DpoConfig),
                  validate=_validate, needs=_needs))
