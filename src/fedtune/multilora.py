"""Batched clients: several FedLLM clients' LoRA adapters trained in one forward/backward over the shared base.

When each client's batch is small (1-4 sequences) a GPU running clients one after another
is bound by kernel launches, not arithmetic. Here K clients train at once, with exactly
the per-client results of the sequential path (`fedtune.paradigms.fedpeft.FedPeftClient`):

* `StackedLora` stacks the K clients' A and B of every LoRA layer into (K, r, in) and
  (K, out, r) parameters and, inside its ``with`` block, replaces each LoRA layer's forward
  with ``base(x) + scaling * B_k A_k x`` where k is the client of each sample (two
  batched matmuls per layer whatever K is; no Python loop over samples or clients).
* The loss is the sum over clients of each client's mean token loss, so the gradient of
  client k's slice is exactly the gradient of client k's own loss: samples never interact
  (the base is frozen, attention stays within a sequence).
* Clipping uses each client's own gradient norm (over its slices); AdamW and SGD are
  elementwise, so one optimizer over the stacked parameters is K optimizers side by side
  (same step count, same weight decay, same bias correction).
* FedProx's proximal term over the stacked parameters is the sum of the clients' terms.
* Clients with fewer local steps (``train.local_epochs`` with different data sizes) leave
  the pass after their last step; their adapter is read out then.
* Batches are right-padded to a common width. With causal attention a real token only
  attends to earlier real tokens, and position ids run 0.. from the left, so no client's
  loss depends on the padding the others bring.

On a GPU the pass is launch-bound unless it is one graph: when every client takes the same
number of steps of the same batch size, `BatchedFedPeft` steps the combined, right-padded batch
through a `fedtune.train_step.StepRunner` over the stacked parameters (`StackedLora.static_loss`,
`StackedLora.clip_`, capturable AdamW), one CUDA graph replay per step, with the stacked
parameters, optimizer and graphs of each K kept across passes (see `BatchedFedPeft`).

Bit-for-bit equality is not promised: matmuls over a different batch shape round
differently (~1e-7 relative in float32). With ``peft.dropout > 0`` the dropout masks are
drawn from one generator for the whole pass, so results agree in distribution only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import get_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear

from .data.tasks import IGNORE, collate
from .losses import hidden_states, proximal_term, target_positions
from .meter import ComputeMeter
from .models import backbone
from .paradigms.fedpeft import FedPeftClient, State, batches, cpu_copies, make_optimizer, round_rng
from .train_step import StepRunner, pad_to_bucket
from .wire import Message, WireError


def lora_layers(model) -> dict[str, LoraLinear]:
    """The LoRA Linear layers of a PeftModel, by the prefix of their keys in the adapter state.

    Raises ``ValueError`` when the adapter holds anything else (DoRA, trainable biases, LoRA on
    embeddings, ...): the batched forward only knows plain LoRA on Linear layers.
    """
    adapter = model.active_adapter
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    keys = {f"{name}.lora_{ab}.weight" for name in layers for ab in "AB"}
    other = sorted(set(get_peft_model_state_dict(model)) - keys)
    odd = [name for name, m in layers.items() if m.lora_variant or m.merged or adapter not in m.lora_A]
    if other or odd:
        raise ValueError(
            f"runtime.batch_clients > 1 trains plain LoRA on Linear layers only; this adapter also has "
            f"{(other + odd)[:3]}: set runtime.batch_clients=1."
        )
    return layers


@dataclass
class Routing:
    """Which client (slot 0..K-1) each sample of a combined batch belongs to.

    Samples of one client are contiguous, in ``groups`` order: ``(slot, count)``.
    """

    index: torch.Tensor  # (N,) slot of each sample, on the model's device
    groups: list[tuple[int, int]]
    slots: torch.Tensor  # (G,) the slots of the groups, in order, on the model's device
    uniform: bool  # every group has the same count: the grouped (no-gather) path applies
    all_slots: bool  # the groups are exactly slots 0..K-1 in order: no index_select either


def combine(per_client: Sequence[dict[str, torch.Tensor] | None], pad_id: int, num_slots: int | None = None,
            device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], Routing]:
    """Concatenate the clients' collated batches (None: the client sits this step out), right-padded.

    Returns the combined ``input_ids``, ``attention_mask`` and ``labels`` on ``device`` and the routing.
    """
    parts = [(slot, b) for slot, b in enumerate(per_client) if b is not None]
    if not parts:
        raise ValueError("combine needs at least one client batch")
    for slot, b in parts:
        if not bool((b["labels"][:, 1:] != IGNORE).any()):
            raise ValueError("a training batch has no target tokens: data.max_length is too short for the prompts.")
    width = max(b["input_ids"].shape[1] for _, b in parts)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    out = {key: torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=v) for _, b in parts]).to(device)
           for key, v in fill.items()}
    groups = [(slot, int(b["input_ids"].shape[0])) for slot, b in parts]
    counts = {n for _, n in groups}
    k = num_slots if num_slots is not None else len(per_client)
    index = torch.cat([torch.full((n,), slot, dtype=torch.long) for slot, n in groups]).to(device)
    slots = torch.tensor([slot for slot, _ in groups], dtype=torch.long, device=device)
    return out, Routing(index, groups, slots, uniform=len(counts) == 1,
                        all_slots=[slot for slot, _ in groups] == list(range(k)))


class StackedLora:
    """K clients' LoRA adapters stacked over one PeftModel, trained in one pass.

    ``with stacked:`` routes every LoRA layer of the model through the stacked weights;
    leaving the block restores the model's own LoRA forward (whose values are never touched),
    so the sequential clients and evaluation see the model exactly as before.

    Args:
        model: A PeftModel with plain LoRA on Linear layers.
        states: One adapter state per client (PEFT key names, as `fedpeft.adapter_state` gives).
    """

    def __init__(self, model, states: Sequence[State]) -> None:
        if not states:
            raise ValueError("StackedLora needs at least one client state")
        self.model = model
        self.layers = lora_layers(model)
        self.num_clients = len(states)
        self.adapter = model.active_adapter
        self.keys = [f"{name}.lora_{which}.weight" for name in self.layers for which in ("A", "B")]
        self.A: dict[str, torch.nn.Parameter] = {}
        self.B: dict[str, torch.nn.Parameter] = {}
        for name, layer in self.layers.items():
            for which, table in (("A", self.A), ("B", self.B)):
                ref = getattr(layer, f"lora_{which}")[self.adapter].weight
                table[name] = torch.nn.Parameter(ref.new_zeros(self.num_clients, *ref.shape))
        self.routing: Routing | None = None
        self._saved: dict[str, Any] = {}
        self.load_(states)

    def load_(self, states: Sequence[State]) -> None:
        """Copy one adapter state per client into the stacked parameters, in place.

        The parameters keep their addresses, so an optimizer and CUDA graphs built over them stay
        valid from one pass to the next. Every state is checked (keys, shapes) before anything is
        copied; the distinct states go to the device in one transfer (in simulation the clients of
        a round often receive the very same tensors, which then travel once).
        """
        if len(states) != self.num_clients:
            raise ValueError(f"this StackedLora holds {self.num_clients} clients, got {len(states)} states")
        expected = set(self.keys)
        params = self.params
        for state in states:
            if set(state) != expected:
                missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
                raise WireError(f"adapter state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
            for key, p in zip(self.keys, params):
                if tuple(state[key].shape) != tuple(p.shape[1:]):
                    raise WireError(f"{key} has shape {tuple(state[key].shape)}, the model's is {tuple(p.shape[1:])}")
        # Distinct states (by tensor identity) and the slots that receive each.
        groups: dict[tuple[int, ...], tuple[list[torch.Tensor], list[int]]] = {}
        for slot, state in enumerate(states):
            src = [state[k] for k in self.keys]
            groups.setdefault(tuple(map(id, src)), (src, []))[1].append(slot)
        every = [t for src, _ in groups.values() for t in src]
        flat = torch.cat([t.reshape(-1) for t in every]).to(params[0].device, params[0].dtype)
        views = iter(part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in every]), every))
        with torch.no_grad():
            for src, slots in groups.values():
                mine = [next(views) for _ in src]
                if len(slots) == self.num_clients:  # everyone starts from this state: one broadcast copy
                    torch._foreach_copy_(params, [v.unsqueeze(0).expand_as(p) for v, p in zip(mine, params)])
                    continue
                for slot in slots:
                    torch._foreach_copy_([p[slot] for p in params], mine)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The stacked trainable parameters (A then B of every layer), each with the client on dim 0."""
        return [p for name in self.layers for p in (self.A[name], self.B[name])]

    def state(self, slot: int) -> State:
        """A detached CPU copy of one client's adapter state, in PEFT key names (as `fedpeft.adapter_state`)."""
        return dict(zip(self.keys, cpu_copies([p[slot] for p in self.params])))

    def states(self) -> list[State]:
        """Every client's adapter state (as `state`), read from the device in one transfer."""
        stacked = cpu_copies(self.params)
        return [dict(zip(self.keys, (t[slot] for t in stacked))) for slot in range(self.num_clients)]

    def route_all(self, per_client: int) -> None:
        """Route a combined batch of ``per_client`` samples from every client, slot 0 first (`static_loss`'s input).

        Set inside the ``with`` block, before the static loss runs (or is captured); leaving the block clears it.
        """
        k = self.num_clients
        device = self.params[0].device
        slots = torch.arange(k, device=device)
        self.routing = Routing(slots.repeat_interleave(per_client), [(slot, per_client) for slot in range(k)],
                               slots, uniform=True, all_slots=True)

    # ------------------------------------------------------------------ forward

    def __enter__(self) -> StackedLora:
        for name, layer in self.layers.items():
            self._saved[name] = layer.__dict__.get("forward")
            layer.forward = _RoutedForward(self, name, layer)
        return self

    def __exit__(self, *exc) -> None:
        for name, layer in self.layers.items():
            saved = self._saved.pop(name, None)
            if saved is None:
                del layer.forward
            else:
                layer.forward = saved
        self.routing = None

    def lora_delta(self, name: str, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        """``B_k A_k dropout(x)`` for every sample, with k the sample's client (unscaled)."""
        r = self.routing
        if r is None:
            raise RuntimeError("StackedLora forward without routing: call loss(), not the model, inside the block")
        a, b = self.A[name], self.B[name]
        x = layer.lora_dropout[self.adapter](x)
        lead, width = x.shape[:-1], x.shape[-1]
        if r.uniform:
            # Every client in the pass has the same number of samples: view them as (clients, tokens, in).
            a_g, b_g = (a, b) if r.all_slots else (a.index_select(0, r.slots), b.index_select(0, r.slots))
            xg = x.reshape(len(r.groups), -1, width)
        else:
            a_g, b_g = a.index_select(0, r.index), b.index_select(0, r.index)
            xg = x.reshape(r.index.shape[0], -1, width)
        h = torch.bmm(xg, a_g.transpose(1, 2))
        return torch.bmm(h, b_g.transpose(1, 2)).reshape(*lead, b.shape[1])

    def loss(self, batch: dict[str, torch.Tensor], routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward a combined batch; return (sum of the clients' mean token losses, those means per group).

        Must run inside the ``with`` block. Each mean is over the client's own target tokens only,
        as `fedtune.losses.lm_loss` computes it for the client alone.
        """
        self.routing = routing
        h = hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        (rows, cols), targets = target_positions(batch["labels"])
        logits = self.model.get_output_embeddings()(h[rows, cols]).float()
        ce = F.cross_entropy(logits, targets, reduction="none")
        slot = routing.index[rows]
        sums = torch.zeros(self.num_clients, dtype=ce.dtype, device=ce.device).index_add(0, slot, ce)
        counts = torch.bincount(slot, minlength=self.num_clients)
        means = sums.index_select(0, routing.slots) / counts.index_select(0, routing.slots)
        return means.sum(), means

    def static_loss(self, model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`fedtune.train_step.static_loss` for K clients at once: (sum of the clients' means, the means (K,)).

        ``input_ids`` and ``labels`` are right-padded to one width, every client's samples contiguous and
        in slot order, as `route_all` routes them. No attention mask, the head on every position, and
        each client's mean over its own target tokens taken with fixed shapes (a (K, tokens) view):
        nothing here synchronises with the host, so a CUDA graph can capture it.
        """
        r = self.routing
        k = self.num_clients
        if r is None or not r.all_slots or not r.uniform or r.index.shape[0] != input_ids.shape[0]:
            raise RuntimeError("static_loss needs route_all(per_client) for this batch inside the with block")
        hidden = backbone(model)(input_ids=input_ids).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1]).float()
        nxt = labels[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), nxt.reshape(-1), ignore_index=IGNORE,
                             reduction="none")
        means = ce.view(k, -1).sum(1) / (nxt != IGNORE).reshape(k, -1).sum(1).clamp(min=1)
        return means.sum(), means

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Clip each client's gradient by the norm of its own slices, as `clip_grad_norm_` clips a client alone.

        Returns the per-client norms before clipping, shape (K,).
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        # Capturable: no host synchronisation (the norm and the coefficient stay on the device).
        # One concatenation and one norm instead of a norm per layer: few kernels whatever the depth.
        flat = torch.cat([g.reshape(self.num_clients, -1) for g in grads], dim=1)
        total = torch.linalg.vector_norm(flat, dim=1)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0).view(-1, 1, 1).to(flat.dtype)
        torch._foreach_mul_(grads, [coef] * len(grads))
        return total


class _RoutedForward:
    """A LoRA layer's forward while stacked: the base layer plus each sample's own client's LoRA."""

    def __init__(self, stacked: StackedLora, name: str, layer: LoraLinear) -> None:
        self.stacked, self.name, self.layer = stacked, name, layer

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        result = layer.base_layer(x, *args, **kwargs)
        a = self.stacked.A[self.name]
        # As peft's own forward: LoRA in its weights' dtype, the sum cast back to the base's.
        delta = self.stacked.lora_delta(self.name, layer, layer._cast_input_dtype(x, a.dtype))
        return (result + delta * layer.scaling[self.stacked.adapter]).to(result.dtype)


# --------------------------------------------------------------------------- the batched client app


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
        clients: The FedLLM client apps by node id; they must share one model, device and settings.
        static: Use the static pass where it applies; default: on CUDA when ``cuda_graphs`` is set.
            On the CPU it runs the same static math without graphs (how the tests check it).
    """

    def __init__(self, clients: Mapping[int, FedPeftClient], static: bool | None = None) -> None:
        apps = list(clients.values())
        if not apps:
            raise ValueError("BatchedFedPeft needs at least one client")
        first = apps[0]
        for app in apps:
            if not isinstance(app, FedPeftClient):
                raise ValueError("runtime.batch_clients > 1 batches FedLLM clients only (federation.paradigm "
                                 f"fedpeft or fedprox), got a {type(app).__name__}: set runtime.batch_clients=1.")
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

    def _pass_for(self, apps: list[FedPeftClient], messages: Sequence[Message]) -> tuple[StackedLora, StepRunner]:
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

    def _static_pass(self, apps: list[FedPeftClient], messages: Sequence[Message], rounds: list[int],
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

    def _eager_pass(self, apps: list[FedPeftClient], messages: Sequence[Message], rounds: list[int],
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
        meter = ComputeMeter(device, count_flops=s.count_flops)
        try:
            with meter, stacked:
                for step in range(max(steps)):
                    chunks = [next(stream) if step < n else None for stream, n in zip(streams, steps)]
                    per_client = [collate(c, first.pad_id) if c is not None else None for c in chunks]
                    batch, routing = combine(per_client, first.pad_id, k, device)
                    loss, means = stacked.loss(batch, routing)
                    total = loss + proximal_term(params, anchor, s.prox_mu) if anchor is not None else loss
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    if s.max_grad_norm:
                        stacked.clip_(s.max_grad_norm)
                    opt.step()
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
        return self._replies(apps, rounds, finals, values, seen, tokens, meter.flops, meter)

    @staticmethod
    def _replies(apps: list[FedPeftClient], rounds: list[int], finals: Sequence[State], losses: list[list[float]],
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
