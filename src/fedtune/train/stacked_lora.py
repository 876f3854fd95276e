"""Several clients' LoRA adapters stacked over one shared base and trained in one forward/backward.

When each client's batch is small (1-4 sequences) a GPU running clients one after another
is bound by kernel launches, not arithmetic. `StackedLora` lets K clients train at once with
exactly the per-client math of training each alone:

* it stacks the K clients' A and B of every LoRA layer into (K, r, in) and (K, out, r)
  parameters and, inside its ``with`` block, replaces each LoRA layer's forward with
  ``base(x) + scaling * B_k A_k x`` where k is the client of each sample (two batched
  matmuls per layer whatever K is; no Python loop over samples or clients);
* the loss is the sum over clients of each client's mean token loss (`train.losses.mean_token_loss`
  per group), so the gradient of client k's slice is exactly the gradient of client k's own loss:
  samples never interact (the base is frozen, attention stays within a sequence);
* clipping uses each client's own gradient norm (over its slices); AdamW and SGD are
  elementwise, so one optimizer over the stacked parameters is K optimizers side by side;
* batches are right-padded to a common width (`combine`). With causal attention a real token only
  attends to earlier real tokens, and position ids run 0.. from the left, so no client's
  loss depends on the padding the others bring.

FedLLM's batched client runner (`fedtune.paradigms.fedpeft_batched`) drives it, eagerly or as one
CUDA graph per step through `fedtune.train.step_runner.StepRunner` (`StackedLora.static_loss`,
`StackedLora.clip_`). Bit-for-bit equality with the sequential path is not promised: matmuls over
a different batch shape round differently (~1e-7 relative in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import get_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear

from ..data.tasks import IGNORE
from ..wire import WireError
from .adapter import State, cpu_copies
from .losses import hidden_states, mean_token_loss


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
        states: One adapter state per client (PEFT key names, as `train.adapter.adapter_state` gives).
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
        as `fedtune.train.losses.lm_loss` computes it for the client alone.
        """
        self.routing = routing
        h = hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        means = mean_token_loss(self.model, h, batch["labels"], groups=self.num_clients,
                                sample_group=routing.index).index_select(0, routing.slots)
        return means.sum(), means

    def static_loss(self, model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`fedtune.train.losses.static_loss` for K clients at once: (sum of the clients' means, the means (K,)).

        ``input_ids`` and ``labels`` are right-padded to one width, every client's samples contiguous and
        in slot order, as `route_all` routes them. No attention mask, the head on every position, and
        each client's mean over its own target tokens taken with fixed shapes (a (K, tokens) view):
        nothing here synchronises with the host, so a CUDA graph can capture it.
        """
        r = self.routing
        k = self.num_clients
        if r is None or not r.all_slots or not r.uniform or r.index.shape[0] != input_ids.shape[0]:
            raise RuntimeError("static_loss needs route_all(per_client) for this batch inside the with block")
        means = mean_token_loss(model, hidden_states(model, input_ids), labels, static=True, groups=k)
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
