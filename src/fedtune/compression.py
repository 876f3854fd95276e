"""Update compression: top-k sparsification with error feedback, 8-bit and 4-bit stochastic quantization.

What travels is the difference between a state and what the receiver already holds, compressed, as a real
`wire` message (safetensors + JSON header), so its bytes are exactly ``len(encode(message))``:

* ``topk``: the ``ratio`` largest-magnitude entries of the whole flattened update (one top-k over all the
  adapter's tensors), as ``idx`` (int32, ascending) and ``val`` (float32);
* ``int8`` / ``int4``: every block of `BLOCK` values scaled by its absolute maximum to [-127, 127] or
  [-7, 7] and rounded stochastically (unbiased: E[decode] = update), as ``q`` (int8, or two 4-bit codes a
  byte in uint8) and ``scale`` (float32, one a block).

Directions (``compression.direction``):

* **up**: a client sends ``u = (state - view) + e`` compressed, where ``view`` is the global state it
  trained from and ``e`` its residual (error feedback: what earlier compressions left out), and keeps
  ``e = u - decode(encode(u))`` (`ClientLink`). The server adds the decoded update to that same view.
* **down**: the server keeps, for every client, the client's view of the global state, and sends
  ``global - view`` compressed; both ends add the decoded message to the view (`ServerLink`). The part not
  sent (``global - view``) is the server's residual: it goes out the next time that client is sampled.
  Both views start at the initial adapter, which every party builds from the run's seed.

Error bounds of ``decode(encode(x))`` (`bound`): top-k is exact on the kept entries and zero elsewhere;
int8 and int4 err by less than one quantization step, ``absmax(block) / 127`` and ``absmax(block) / 7``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from . import registry
from .registry import Option, register_option
from .wire import WireError

State = dict[str, torch.Tensor]
Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]

KINDS = ("none", "topk", "int8", "int4")
BLOCK = 256
"""Values per quantization block (one float32 scale each: 1.6% over the codes of int8, 3.1% over int4)."""
LEVELS = {"int8": 127, "int4": 7}
"""Largest code of each quantizer (symmetric: codes in [-L, L])."""


@dataclass
class CompressionConfig:
    kind: Literal["none", "topk", "int8", "int4"] = "none"
    """Update compression: `none` (fp32 states), `topk` (the largest `ratio` of the update's entries, with error feedback), `int8` or `int4` (block-wise stochastic quantization); see docs/compression.md. FedLLM (fedpeft, fedprox), local runtime."""
    ratio: float = 0.01
    """`topk`: the fraction of the update's entries sent, in (0, 1] (each costs 8 bytes: an int32 index and a float32 value)."""
    direction: Literal["up", "down", "both"] = "both"
    """Compress the clients' updates (`up`), the server's global state (`down`, against each client's last view of it), or `both`."""
    error_feedback: bool = True
    """`up`: the client keeps what compression left out of its update and adds it to the next one. (`down` always sends the difference to the client's own view of the global state, so nothing is lost there.)"""


def _validate(config) -> None:
    c = config.compression
    if c.kind == "none":
        return
    if not 0 < c.ratio <= 1:
        raise ValueError(f"compression.ratio = {c.ratio!r} is not allowed: a fraction in (0, 1] of the update's "
                         "entries (e.g. 0.01).")
    if not registry.get(config.federation.paradigm).update_link:
        raise ValueError(f"compression.kind = {c.kind!r} is not allowed with federation.paradigm = "
                         f"{config.federation.paradigm!r}: update compression applies to FedLLM (fedpeft, fedprox). "
                         "Set compression.kind: none.")
    if config.runtime.batch_clients > 1:
        raise ValueError(f"compression.kind = {c.kind!r} is not allowed with runtime.batch_clients = "
                         f"{config.runtime.batch_clients}: compressed clients run one at a time. Set "
                         "runtime.batch_clients: 1.")


register_option(Option("compression", CompressionConfig, _validate))


# --------------------------------------------------------------------------- codecs


def spec_of(state: Mapping[str, torch.Tensor]) -> Spec:
    """Names (sorted: both ends flatten in the same order), shapes and dtypes of `state`."""
    return {k: (tuple(state[k].shape), state[k].dtype) for k in sorted(state)}


def flatten(state: Mapping[str, torch.Tensor], spec: Spec) -> torch.Tensor:
    """The tensors of `state` named by `spec`, in its order, as one float32 vector on the CPU."""
    return torch.cat([state[k].detach().to("cpu", torch.float32).reshape(-1) for k in spec])


def unflatten(flat: torch.Tensor, spec: Spec) -> State:
    """Inverse of `flatten`: the tensors of `spec` (names, shapes, dtypes) from one vector."""
    out: State = {}
    offset = 0
    for k, (shape, dtype) in spec.items():
        n = math.prod(shape)
        out[k] = flat[offset:offset + n].reshape(shape).to(dtype)
        offset += n
    return out


def kept(n: int, ratio: float) -> int:
    """How many of `n` entries top-k keeps (at least one)."""
    return min(n, max(1, math.ceil(ratio * n)))


def encode(u: torch.Tensor, kind: str, *, ratio: float = 0.01, generator: torch.Generator | None = None) -> State:
    """The wire tensors of a flat float32 update `u` compressed by `kind` (``topk``, ``int8``, ``int4``)."""
    u = u.detach().to("cpu", torch.float32).reshape(-1)
    if kind == "topk":
        idx = torch.topk(u.abs(), kept(u.numel(), ratio), sorted=False).indices.sort().values
        return {"idx": idx.to(torch.int32), "val": u[idx].clone()}
    if kind not in LEVELS:
        raise ValueError(f"compression.kind = {kind!r} is not one of {', '.join(KINDS)}")
    levels = LEVELS[kind]
    blocks = -(-u.numel() // BLOCK)
    padded = torch.zeros(blocks * BLOCK)
    padded[:u.numel()] = u
    padded = padded.view(blocks, BLOCK)
    scale = padded.abs().amax(dim=1) / levels
    scaled = padded / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    # Stochastic rounding: floor(x + U[0, 1)) is x + (x - floor x is kept with its own probability): unbiased.
    noise = torch.rand(scaled.shape, generator=generator)
    q = torch.floor(scaled + noise).clamp_(-levels, levels).to(torch.int8).reshape(-1)[:u.numel()]
    if kind == "int8":
        return {"q": q, "scale": scale}
    codes = (q + 8).to(torch.uint8)  # 1..15
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.full((1,), 8, dtype=torch.uint8)])
    return {"q": codes[0::2] | (codes[1::2] << 4), "scale": scale}


def decode(tensors: Mapping[str, torch.Tensor], kind: str, n: int, *, ratio: float = 0.01) -> torch.Tensor:
    """The flat float32 update of `n` entries that `encode` wrote; `WireError` for anything else."""
    expect = spec_for(kind, n, ratio)
    if set(tensors) != set(expect):
        raise WireError(f"a {kind} update has tensors {sorted(tensors)}, expected {sorted(expect)}")
    for k, (shape, dtype) in expect.items():
        t = tensors[k]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise WireError(f"a {kind} update's {k!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
    if kind == "topk":
        idx, val = tensors["idx"].long(), tensors["val"].float()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise WireError(f"a topk update's indices leave [0, {n})")
        if not bool(torch.isfinite(val).all()):
            raise WireError("a topk update holds NaN/Inf values")
        out = torch.zeros(n)
        out[idx] = val
        return out
    scale = tensors["scale"].float()
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise WireError(f"a {kind} update has negative or non-finite scales")
    if kind == "int8":
        q = tensors["q"].float()
    else:
        packed = tensors["q"]
        q = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:n].float() - 8
    blocks = scale.numel()
    padded = torch.zeros(blocks * BLOCK)
    padded[:n] = q
    return (padded.view(blocks, BLOCK) * scale.unsqueeze(1)).reshape(-1)[:n]


def spec_for(kind: str, n: int, ratio: float) -> Spec:
    """The wire tensors (names, shapes, dtypes) of a `kind` update of `n` entries."""
    if kind == "topk":
        k = kept(n, ratio)
        return {"idx": ((k,), torch.int32), "val": ((k,), torch.float32)}
    blocks = -(-n // BLOCK)
    q = ((n,), torch.int8) if kind == "int8" else (((n + 1) // 2,), torch.uint8)
    return {"q": q, "scale": ((blocks,), torch.float32)}


def bound(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The largest error `decode(encode(x))` may make on each entry of the flat `x` (top-k: exact where kept)."""
    x = x.detach().float().reshape(-1)
    if kind == "topk":
        return torch.zeros_like(x)  # on the kept entries; the others decode to exactly 0
    blocks = -(-x.numel() // BLOCK)
    padded = torch.zeros(blocks * BLOCK)
    padded[:x.numel()] = x.abs()
    step = padded.view(blocks, BLOCK).amax(dim=1) / LEVELS[kind]
    return step.repeat_interleave(BLOCK)[:x.numel()]


# --------------------------------------------------------------------------- the two ends


class ServerLink:
    """The server's end for one run: what it sends each client, and how it reads their replies.

    Args:
        config: The ``compression`` section.
        initial: The initial payload (what every client holds before its first round).
        seed: The run's seed (stochastic rounding is seeded by seed, round and client).
    """

    def __init__(self, config: CompressionConfig, initial: State, seed: int) -> None:
        self.kind, self.ratio, self.seed = config.kind, config.ratio, seed
        self.down = config.kind != "none" and config.direction in ("down", "both")
        self.up = config.kind != "none" and config.direction in ("up", "both")
        self.feedback = config.error_feedback
        self.spec: Spec = spec_of(initial)
        self.initial = flatten(initial, self.spec) if self.down else None
        self.views: dict[int, torch.Tensor] = {}  # client -> its view of the payload (down)
        self.sent: dict[int, State] = {}  # client -> the payload as it has it this round

    def send(self, node: int, rnd: int, payload: State) -> State:
        """The tensors of the message to `node` in round `rnd` (compressed when ``down``)."""
        if not self.down:
            self.sent[node] = payload
            return payload
        view = self.views.get(node, self.initial)
        u = flatten(payload, self.spec) - view
        wire = encode(u, self.kind, ratio=self.ratio, generator=_generator(self.seed, rnd, node, 1))
        new_view = view + decode(wire, self.kind, u.numel(), ratio=self.ratio)
        self.views[node] = new_view
        self.sent[node] = unflatten(new_view, self.spec)
        return wire

    def receive(self, node: int, tensors: Mapping[str, torch.Tensor], spec: Spec) -> State:
        """A reply's full tensors (`spec`: what the reply holds), decoded against what `node` was sent."""
        if not self.up:
            return dict(tensors)
        sent, spec = self.sent[node], dict(sorted(spec.items()))
        reference = {k: sent[k] if k in sent else torch.zeros(shape) for k, (shape, _) in spec.items()}
        flat = flatten(reference, spec) + decode(tensors, self.kind, sum(math.prod(s) for s, _ in spec.values()),
                                                  ratio=self.ratio)
        return unflatten(flat, spec)

    def state_dict(self) -> State:
        """The clients' views (for a checkpoint): ``view/<client>`` (and ``initial``) when ``down``."""
        if not self.down:
            return {}
        return {"initial": self.initial.clone(), **{f"view/{n}": v.clone() for n, v in self.views.items()}}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if not self.down:
            if state:
                raise ValueError("the checkpoint holds compressed views but compression.direction sends the "
                                 "global state uncompressed: resume with the config that wrote it")
            return
        self.initial = state["initial"].clone() if "initial" in state else self.initial
        self.views = {int(k.split("/", 1)[1]): v.clone() for k, v in state.items() if k.startswith("view/")}


class ClientLink:
    """A client's end: reads what comes down into its view, and compresses what goes up (error feedback).

    The client's state (its view of the payload, its residual) is a plain dict of tensors, kept by the
    caller between rounds (`fedtune.client_state`): ``view`` and ``residual``.
    """

    def __init__(self, config: CompressionConfig, initial: State, seed: int) -> None:
        self.kind, self.ratio, self.seed = config.kind, config.ratio, seed
        self.down = config.kind != "none" and config.direction in ("down", "both")
        self.up = config.kind != "none" and config.direction in ("up", "both")
        self.feedback = config.error_feedback
        self.spec: Spec = spec_of(initial)
        self.initial = initial

    def receive(self, tensors: Mapping[str, torch.Tensor], state: State) -> State:
        """The payload from the message's tensors; updates ``state["view"]``."""
        if not self.down:
            return dict(tensors)
        view = state.get("view")
        view = flatten(self.initial, self.spec) if view is None else view
        new_view = view + decode(tensors, self.kind, view.numel(), ratio=self.ratio)
        state["view"] = new_view
        return unflatten(new_view, self.spec)

    def send(self, node: int, rnd: int, reply: State, view: State, state: State) -> State:
        """The wire tensors of `reply` against `view` (what this client received); updates ``state["residual"]``."""
        if not self.up:
            return reply
        spec = spec_of(reply)
        reference = {k: view[k] if k in view else torch.zeros(shape) for k, (shape, _) in spec.items()}
        u = flatten(reply, spec) - flatten(reference, spec)
        if self.feedback and "residual" in state:
            u = u + state["residual"]
        wire = encode(u, self.kind, ratio=self.ratio, generator=_generator(self.seed, rnd, node, 2))
        if self.feedback:
            state["residual"] = u - decode(wire, self.kind, u.numel(), ratio=self.ratio)
        return wire


def _generator(seed: int, rnd: int, node: int, direction: int) -> torch.Generator:
    """The stochastic-rounding generator of one message (seeded: a resumed run rounds the same way)."""
    return torch.Generator().manual_seed(hash((seed, rnd, node, direction, 0xC0)) & 0xFFFFFFFFFFFF)
