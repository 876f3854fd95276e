"""FedLLM's batched client runner: several `FedPeftClient`s' rounds in one pass (``runtime.batch_clients``).

The stacking math is `fedtune.train.stacked_lora`; this module runs FedLLM's client rounds through it
and writes each client's ``fit_res`` reply exactly as `fedpeft.FedPeftClient` would. The local runtime
calls it through the registry (``Paradigm.batched``); it reads the clients' data, settings and seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..data.tasks import IGNORE, collate
from ..flops import FlopCache
from ..meter import ComputeMeter
from ..train.adapter import State
from ..train.local_steps import batches, clip_and_step, make_optimizer, round_rng
from ..train.losses import proximal_term
from ..train.stacked_lora import StackedLora, combine, lora_layers
from ..train.step_runner import StepRunner, pad_to_bucket
from ..wire import Message


class BatchedFedPeft:
    """Runs several `FedPeftClient`s' rounds in one batched pass (the runtime's ``run_batch``).

    Each client keeps its own data order (the same `round_rng` draws as when it runs alone), its
    own optimizer state, clipping, FedProx anchor and number of steps. Replies carry the same meta
    as `FedPeftClient`'s; the FLOPs and seconds of the shared pass are split among the clients in
    proportion to the real (unpadded) tokens each fed it, and ``peak_memory_bytes`` is the whole
    pass's peak.

    Two ways to run a pass:

    * **static** (default on CUDA with ``train.cuda_graphs``): when every client takes the same
      number of steps of the same batch size, the K clients' batches are combined into one
      right-padded, bucketed batch and stepped by a `StepRunner` over the stacked parameters
      (`StackedLora.static_loss`, per-client clipping, capturable AdamW): on CUDA one graph
      replay per step, captured once per (K, batch, width). The stacked parameters, the
      optimizer and the graphs of each K are kept across passes (states are loaded in place,
      the optimizer state zeroed in place), and the losses are read once, after the last step.
    * **eager** otherwise (clients with different step or batch counts, or ``static=False``):
      the routed masked forward of `StackedLora.loss`, one step at a time.

    Args:
        clients: The FedLLM client apps (`fedpeft.FedPeftClient`) by node id; they must share one model,
            device and settings.
        static: Use the static pass where it applies; default: on CUDA when ``cuda_graphs`` is set.
            On the CPU it runs the same static math without graphs (how the tests check it).
    """

    def __init__(self, clients: Mapping[int, Any], static: bool | None = None) -> None:
        apps = list(clients.values())
        if not apps:
            raise ValueError("BatchedFedPeft needs at least one client")
        first = apps[0]
        for app in apps:
            if app.persistent_optimizer:
                raise ValueError("runtime.batch_clients > 1 does not apply to the centralized baseline "
                                 "(one client with a persistent optimizer): set runtime.batch_clients=1.")
            if (app.model is not first.model or app.settings != first.settings or app.device != first.device
                    or app.pad_id != first.pad_id):
                raise ValueError("batched clients must share one model, device, padding id and training settings")
        lora_layers(first.model)  # fail at start-up, not in the first round, on adapters it cannot batch
        self.clients = dict(clients)
        cuda = torch.device(first.device).type == "cuda"
        self.static = first.settings.cuda_graphs and cuda if static is None else static
        self.passes: dict[int, tuple[StackedLora, StepRunner]] = {}
        """The static pass of each K: the stacked parameters and the runner (optimizer, graphs) over them."""

    def __call__(self, messages: Sequence[Message]) -> list[Message]:
        apps = [self.clients[int(m.meta["dst"])] for m in messages]
        s = apps[0].settings
        rounds = [int(m.meta["round"]) for m in messages]
        steps = [s.steps_for(len(app.examples)) for app in apps]
        # Uniform: every step of every client is exactly batch_size examples (`batches` takes fewer only
        # from a client with fewer examples than that), and all clients take the same number of steps.
        uniform = len(set(steps)) == 1 and all(len(app.examples) >= s.batch_size for app in apps)
        if self.static and uniform:
            return self._static_pass(apps, messages, rounds, steps[0])
        return self._eager_pass(apps, messages, rounds, steps)

    # ------------------------------------------------------------------ static (CUDA graphs)

    def _pass_for(self, apps: list[Any], messages: Sequence[Message]) -> tuple[StackedLora, StepRunner]:
        """The stacked parameters and runner for K = len(apps), loaded with the messages' states."""
        k = len(apps)
        states = [m.tensors for m in messages]
        if k in self.passes:
            stacked, runner = self.passes[k]
            stacked.load_(states)
            return stacked, runner
        first = apps[0]
        s, device = first.settings, torch.device(first.device)
        cuda = device.type == "cuda"
        stacked = StackedLora(first.model, states)
        runner = StepRunner(first.model, lambda params, capturable: make_optimizer(params, s, capturable),
                            max_grad_norm=s.max_grad_norm, prox_mu=s.prox_mu, device=device, pad_id=first.pad_id,
                            graphs=s.cuda_graphs and cuda, static=True, count_flops=s.count_flops,
                            compile=s.compile and cuda, params=stacked.params, loss=stacked.static_loss,
                            clip=lambda params, max_norm: stacked.clip_(max_norm))
        self.passes[k] = (stacked, runner)
        return stacked, runner

    def _static_pass(self, apps: list[Any], messages: Sequence[Message], rounds: list[int],
                     steps: int) -> list[Message]:
        first = apps[0]
        model, s, device, pad = first.model, first.settings, first.device, first.pad_id
        k = len(apps)
        stacked, runner = self._pass_for(apps, messages)
        runner.reset()
        streams = [batches(app.examples, s.batch_size, steps, round_rng(app.seed, rnd, app.node_id)[0])
                   for app, rnd in zip(apps, rounds)]
        # One generator for the pass (only LoRA dropout draws from it).
        torch.manual_seed(round_rng(first.seed, rounds[0], first.node_id)[1])
        seen, tokens = [0] * k, [0] * k
        ids = ", ".join(str(a.node_id) for a in apps)
        first.bars.start("steps", steps, info=f"clients {ids}")
        if not model.training:
            model.train()
        # The runner counts FLOPs itself (once per batch shape, eagerly): the meter only times.
        meter = ComputeMeter(device, count_flops=False)
        with meter, stacked:
            stacked.route_all(s.batch_size)
            for _ in range(steps):
                per_client = [collate(next(stream), pad) for stream in streams]
                combined, _ = combine(per_client, pad)  # on the CPU; the runner copies it in
                runner.step_static(pad_to_bucket(combined, runner.bucket, pad))
                for slot, b in enumerate(per_client):
                    seen[slot] += b["input_ids"].shape[0]
                    tokens[slot] += int(b["attention_mask"].sum())
                first.bars.advance("steps", info=f"clients {ids}")  # no loss: it would wait for the device
            per_step = runner.losses()  # (steps, K): the pass's one wait for the device
            finals = stacked.states()
        losses = [[row[slot] for row in per_step] for slot in range(k)]
        flops = runner.flops if s.count_flops else None
        return self._replies(apps, rounds, finals, losses, seen, tokens, flops, meter)

    # ------------------------------------------------------------------ eager (any mix of clients)

    def _eager_pass(self, apps: list[Any], messages: Sequence[Message], rounds: list[int],
                    steps: list[int]) -> list[Message]:
        first = apps[0]
        model, s, device = first.model, first.settings, first.device
        stacked = StackedLora(model, [m.tensors for m in messages])
        params = stacked.params
        anchor = [p.detach().clone() for p in params] if s.prox_mu > 0 else None
        opt = make_optimizer(params, s)
        streams = [batches(app.examples, s.batch_size, n, round_rng(app.seed, rnd, app.node_id)[0])
                   for app, rnd, n in zip(apps, rounds, steps)]
        # One generator for the pass (only LoRA dropout draws from it).
        torch.manual_seed(round_rng(first.seed, rounds[0], first.node_id)[1])
        k = len(apps)
        losses: list[list[torch.Tensor]] = [[] for _ in range(k)]
        finals: list[State | None] = [None] * k
        seen, tokens = [0] * k, [0] * k
        ids = ", ".join(str(a.node_id) for a in apps)
        first.bars.start("steps", max(steps), info=f"clients {ids}")
        model.train()
        meter = ComputeMeter(device, count_flops=False)
        flops = FlopCache(s.count_flops)  # once per (combined batch shape, each client's target count)
        try:
            with meter, stacked:
                for step in range(max(steps)):
                    chunks = [next(stream) if step < n else None for stream, n in zip(streams, steps)]
                    per_client = [collate(c, first.pad_id) if c is not None else None for c in chunks]
                    batch, routing = combine(per_client, first.pad_id, k, device)
                    key = (*batch["input_ids"].shape, tuple(routing.groups),
                           tuple(int((b["labels"][:, 1:] != IGNORE).sum()) for b in per_client if b is not None))
                    with flops.block(key):
                        loss, means = stacked.loss(batch, routing)
                        total = loss + proximal_term(params, anchor, s.prox_mu) if anchor is not None else loss
                        opt.zero_grad(set_to_none=True)
                        total.backward()
                        clip_and_step(params, opt, s.max_grad_norm, lambda _, max_norm: stacked.clip_(max_norm))
                    for (slot, _), mean in zip(routing.groups, means.detach()):
                        losses[slot].append(mean)
                        seen[slot] += len(chunks[slot])
                        tokens[slot] += int(per_client[slot]["attention_mask"].sum())
                        if step + 1 == steps[slot]:
                            finals[slot] = stacked.state(slot)
                    first.bars.advance("steps", info=f"clients {ids} loss {float(loss.detach()) / len(means):.3f}")
        finally:
            model.eval()
        values = [torch.stack(x).cpu().tolist() for x in losses]
        return self._replies(apps, rounds, finals, values, seen, tokens, flops.total, meter)

    @staticmethod
    def _replies(apps: list[Any], rounds: list[int], finals: Sequence[State], losses: list[list[float]],
                 seen: list[int], tokens: list[int], flops: float | None, meter: ComputeMeter) -> list[Message]:
        """`FedPeftClient`'s replies, the pass's FLOPs and seconds split by each client's share of real tokens."""
        share = [t / sum(tokens) for t in tokens]
        replies = []
        for slot, (app, rnd) in enumerate(zip(apps, rounds)):
            values = losses[slot]
            replies.append(Message(finals[slot], {
                "kind": "fit_res",
                "round": rnd,
                "src": app.node_id,
                "num_examples": len(app.examples),
                "examples_seen": seen[slot],
                "steps": len(values),
                "train_loss": sum(values) / len(values),
                "train_loss_first": values[0],
                "train_loss_last": values[-1],
                "flops": round(flops * share[slot]) if flops is not None else None,
                "peak_memory_bytes": meter.peak_memory_bytes,
                "seconds": meter.seconds * share[slot],
                "batched_clients": len(apps),
            }))
        return replies
