"""Secure aggregation (``secagg.*``): the server learns the weighted sum of the clients' updates, never one update.

This is Flower's SecAgg+ (Bell et al., 2020), run by Flower's own code: the server side is
``flwr.server.workflow.SecAggPlusWorkflow`` and the client side ``flwr.client.mod.secaggplus_mod``, with
their key agreement (ECDH), Shamir secret sharing, pseudo-random masks and quantization
(``flwr.common.secure_aggregation``). fedtune only carries their messages and plugs its paradigm in:

* `fedtune.secagg_server.SecAggServer.round` runs one round's four stages (setup, share keys, collect masked vectors, unmask)
  over any fedtune `Grid`: each Flower message travels as its protobuf bytes (Flower's own ``serde``,
  no pickle) in a fedtune `Message` of kind ``secagg``, so the same protocol runs in the in-process
  simulation and over fedtune's Flower runtime;
* `SecAggClient` wraps a client app: the stage messages go through ``secaggplus_mod`` with a Flower
  ``Context`` that keeps the client's keys and shares between stages; at the collect stage the mod calls
  the wrapped app on the round's ``fit_ins`` and masks what it returns.

What the client masks is its update, ``its adapter - the global adapter``, multiplied by its weight
``min(num_examples, W) / W`` (W: ``secagg.max_num_examples``, Flower's ``max_weight``), clipped to
``secagg.clipping_range`` and quantized to ``secagg.quantization_range`` levels; the quantized weight
travels masked beside it. The server unmasks only the sum of the surviving clients' vectors and divides
by the sum of their weights: the example-weighted mean of the updates, FedAvg's, which the configured
strategy (FedAvg, FedAvgM, FedAdam) then takes as the round's average. Robust aggregators need each
update and are refused. Flower's FitRes still carries ``num_examples`` and the client's metrics in the
clear beside the masked vector (its constraint, kept here: the metrics records stay the same).

A client that drops after sharing its keys is tolerated while every surviving client keeps at least
``reconstruction_threshold`` live neighbours: its pairwise masks are rebuilt from the shares of its
secret key. Bytes are the exact encoded sizes of the fedtune messages that carry the stages.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .grid import ClientApp, is_error
from .registry import Option, register_option
from .wire import DEFAULT_MAX_BYTES, Message, WireError, decode, encode, encoded_size, meta_number

KIND = "secagg"
"""`Message.kind` of a message that carries one SecAgg+ stage (a Flower ``RecordDict`` as protobuf bytes)."""

FIT_TYPE = "fedtune.wire"
"""Flower ``Parameters.tensor_type`` of the one tensor of a FitIns: the `wire.encode`d ``fit_ins``."""

MODULUS = 2**32
"""Flower's ``modulus_range``: masks and sums are taken modulo it."""

NODE_OFFSET = 1 << 20
"""Flower node id of fedtune client k: ``NODE_OFFSET + k`` (Flower reserves the small ids)."""

PARADIGMS = ("fedpeft", "fedprox")
"""Paradigms whose server averages adapters through `SecAggServer` (``secagg.enabled``)."""


@dataclass
class SecAggConfig:
    """Secure aggregation (Flower's SecAgg+): the server sees only the masked sum of the clients' updates."""

    enabled: bool = False
    """Mask every client's update so that the server learns only their weighted sum (Flower's SecAgg+); works
    with federation.paradigm fedpeft and fedprox and federation.aggregator mean."""
    num_shares: int | float = 1.0
    """Clients each secret is shared with (itself included): an integer > 2, or a fraction of the round's sampled
    clients (1.0: all of them, the original SecAgg)."""
    reconstruction_threshold: int | float = 0.6
    """Shares needed to rebuild a secret: an integer below num_shares, or a fraction of num_shares. Above half
    keeps a server that lies about who dropped from learning both secrets of a client; lower tolerates more dropouts."""
    max_num_examples: int | None = None
    """W: a client weighs min(num_examples, W) / W (Flower's max_weight); null: the largest training partition
    of the run."""
    clipping_range: float = 1.0
    """Each coordinate of a weighted update is clipped to [-clipping_range, clipping_range] before quantization
    (clients count the clipped coordinates in their record)."""
    quantization_range: int = 2**22
    """Quantization levels over [-clipping_range, clipping_range]: one step is 2 * clipping_range /
    quantization_range; clients_per_round * quantization_range must stay below 2**32."""


def resolved_shares(cfg: SecAggConfig, sampled: int) -> tuple[int, int]:
    """``(num_shares, threshold)`` for a round of `sampled` clients, by Flower's own rules (SecAggPlusWorkflow)."""
    shares = cfg.num_shares
    if isinstance(shares, float):
        n = round(shares * sampled)
        if n < sampled and n % 2 == 0:
            n += 1
        if n <= 2:
            n = sampled
    else:
        n = shares
    if n != sampled and n % 2 == 0:
        n += 1  # Flower makes an even share count odd
    t = cfg.reconstruction_threshold
    t = max(round(t * n), 2) if isinstance(t, float) else t
    return n, t


def validate(c) -> None:
    """Check ``secagg.*`` against the rest of the config (ValueError naming the field and the fix)."""
    s, f = c.secagg, c.federation
    if isinstance(s.num_shares, float) and not 0 < s.num_shares <= 1:
        raise ValueError(f"secagg.num_shares = {s.num_shares!r} is not allowed: an integer > 2 or a fraction in (0, 1].")
    if isinstance(s.num_shares, int) and s.num_shares <= 2:
        raise ValueError(f"secagg.num_shares = {s.num_shares!r} is not allowed: an integer > 2 or a fraction in (0, 1].")
    t = s.reconstruction_threshold
    if isinstance(t, float) and not 0 < t <= 1 or isinstance(t, int) and t < 2:
        raise ValueError(f"secagg.reconstruction_threshold = {t!r} is not allowed: an integer >= 2 or a fraction in "
                         "(0, 1] of num_shares.")
    if not s.clipping_range > 0:
        raise ValueError(f"secagg.clipping_range = {s.clipping_range!r} is not allowed: a positive number.")
    if not 1 <= s.quantization_range < MODULUS:
        raise ValueError(f"secagg.quantization_range = {s.quantization_range!r} is not allowed: an integer in [1, 2**32).")
    if s.max_num_examples is not None and s.max_num_examples < 1:
        raise ValueError(f"secagg.max_num_examples = {s.max_num_examples!r} is not allowed: a positive integer or null.")
    if not s.enabled:
        return
    if f.paradigm not in PARADIGMS:
        raise ValueError(f"secagg.enabled = true works with federation.paradigm {' or '.join(PARADIGMS)} (the servers "
                         f"that average adapters through it), not {f.paradigm!r}: set secagg.enabled=false.")
    comp = getattr(getattr(c, "compression", None), "kind", "none")
    if comp != "none" or f.strategy == "scaffold":
        what = f"compression.kind = {comp!r}" if comp != "none" else "federation.strategy = 'scaffold'"
        raise ValueError(f"{what} with secagg.enabled = true is not supported: secure aggregation masks the plain "
                         "adapter update. Set compression.kind=none and a strategy other than scaffold, or "
                         "secagg.enabled=false.")
    dp = getattr(getattr(c, "privacy", None), "dp", "none")
    if dp != "none":
        raise ValueError(f"privacy.dp = {dp!r} with secagg.enabled = true is not supported: DP clips each update where "
                         "the server would see it, and secure aggregation shows the server only their sum. Set "
                         "privacy.dp=none or secagg.enabled=false.")
    if f.aggregator != "mean":
        raise ValueError(f"federation.aggregator = {f.aggregator!r} needs each client's update, which secure aggregation "
                         "hides from the server (it sees only their sum): set federation.aggregator=mean or "
                         "secagg.enabled=false.")
    if c.runtime.batch_clients > 1:
        raise ValueError(f"runtime.batch_clients = {c.runtime.batch_clients} is not allowed with secagg.enabled: each "
                         "client masks its own update; set runtime.batch_clients=1.")
    if c.runtime.world_size > 1:
        raise ValueError(f"runtime.world_size = {c.runtime.world_size} is not allowed with secagg.enabled: a client's "
                         "SecAgg+ keys and shares stay in the process that ran its first stage, and the ranks share "
                         "clients out anew; set runtime.world_size=1 (or run over Flower).")
    sampled = f.clients_per_round
    if sampled < 2:
        raise ValueError(f"federation.clients_per_round = {sampled} is not allowed with secagg.enabled: the sum of one "
                         "update is that update; sample at least 2 clients a round (3 or more to hide each from the others).")
    if sampled * s.quantization_range >= MODULUS:
        raise ValueError(f"secagg.quantization_range = {s.quantization_range} is too large for {sampled} clients a round: "
                         f"their sum must stay below 2**32; use at most {(MODULUS - 1) // sampled}.")
    n, thr = resolved_shares(s, sampled)
    if n > sampled:
        raise ValueError(f"secagg.num_shares = {s.num_shares!r} gives {n} shares for {sampled} clients a round: at most "
                         "federation.clients_per_round; lower it or use a fraction such as 1.0.")
    if thr > n or isinstance(s.num_shares, int) and isinstance(t, int) and thr >= n:
        raise ValueError(f"secagg.reconstruction_threshold = {t!r} gives {thr} of {n} shares: it must be below "
                         "num_shares (Flower's rule; equal to it only as a fraction, and then no client may drop); lower "
                         "it or use a fraction such as 0.6.")


register_option(Option("secagg", SecAggConfig, validate))


# --------------------------------------------------------------------------- carrying Flower messages


def _pack(records, meta: dict[str, Any]) -> Message:
    """A Flower ``RecordDict`` as a fedtune message: its protobuf bytes in one uint8 tensor."""
    from flwr.common.serde import recorddict_to_proto

    data = recorddict_to_proto(records).SerializeToString()
    return Message({"payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, {"kind": KIND, **meta})


def _unpack(msg: Message):
    """The Flower ``RecordDict`` a `_pack`ed message carries (WireError when it is not one)."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    t = msg.tensors.get("payload")
    if t is None or t.dtype != torch.uint8 or t.dim() != 1 or len(msg.tensors) != 1:
        raise WireError("a secagg message holds exactly one 1-D uint8 tensor 'payload'")
    try:
        return recorddict_from_proto(ProtoRecordDict.FromString(t.numpy().tobytes()))
    except Exception as err:  # protobuf's DecodeError and Flower's own checks: bad bytes from a peer
        raise WireError(f"secagg payload is not a Flower RecordDict: {type(err).__name__}: {err}") from None


def _flower_message(records, *, src: int, dst: int, rnd: int, message_id: str):
    from flwr.app import Metadata, MessageType
    from flwr.app.message import make_message

    meta = Metadata(run_id=0, message_id=message_id, src_node_id=src, dst_node_id=dst, reply_to_message_id="",
                    group_id=str(rnd), created_at=time.time(), ttl=43200.0, message_type=MessageType.TRAIN)
    return make_message(meta, content=records)


# --------------------------------------------------------------------------- client side


class SecAggClient(ClientApp):
    """A client app whose ``secagg`` stage messages run through Flower's ``secaggplus_mod``; other messages go to
    the wrapped app as they are.

    Args:
        inner: The paradigm's client app (answers ``fit_ins`` with its adapter and ``num_examples``).
        node_id: The fedtune client id.
        seed: The run's seed: the stochastic rounding of the quantization is seeded by (seed, round, client).
    """

    def __init__(self, inner: ClientApp, node_id: int, seed: int = 0) -> None:
        from flwr.app import Context, RecordDict

        self.inner = inner
        self.node_id = node_id
        self.seed = seed
        self.context = Context(run_id=0, node_id=NODE_OFFSET + node_id, node_config={}, state=RecordDict(), run_config={})
        self.clipped = 0

    def __getattr__(self, name: str):  # the wrapped app's attributes (model, examples, ...) stay reachable
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, msg: Message) -> Message:
        if msg.kind != KIND:
            return self.inner(msg)
        from flwr.client.mod import secaggplus_mod

        rnd = int(meta_number(msg, "round", integer=True))
        nid = NODE_OFFSET + self.node_id
        inbound = _flower_message(_unpack(msg), src=1, dst=nid, rnd=rnd, message_id=f"{rnd}-{nid}-{msg.meta.get('stage')}")
        saved = np.random.get_state()
        # Flower's stochastic rounding draws from numpy's global generator: seeded, and put back afterwards.
        np.random.seed([self.seed & 0xFFFFFFFF, rnd & 0xFFFFFFFF, self.node_id & 0xFFFFFFFF])
        try:
            out = secaggplus_mod(inbound, self.context, self._fit)
        finally:
            np.random.set_state(saved)
        meta = {"round": rnd, "src": self.node_id, "stage": msg.meta.get("stage")}
        if msg.meta.get("stage") == "collect_masked_vectors":
            meta["secagg_clipped"] = self.clipped
        return _pack(out.content, meta)

    def _fit(self, msg, context):
        """The collect stage's inner call: train on the ``fit_ins`` and return the update as Flower's FitRes."""
        import flwr.compat.common.recorddict_compat as compat
        from flwr.app import Message as FlowerMessage
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        if fitins.parameters.tensor_type != FIT_TYPE or len(fitins.parameters.tensors) != 1:
            raise WireError(f"secagg fit_ins must hold one {FIT_TYPE!r} tensor")
        fit = decode(fitins.parameters.tensors[0], max_bytes=DEFAULT_MAX_BYTES)
        reply = self.inner(fit)
        if is_error(reply):
            raise RuntimeError(str(reply.meta.get("error", "the client failed")))
        n = int(meta_number(reply, "num_examples", integer=True))
        if set(reply.tensors) != set(fit.tensors):
            raise WireError("the client's adapter does not have the global adapter's tensors")
        # Flower's mod scales the update by min(n, W) / W; W is the server's max_weight, in the mod's state.
        cap = float(context.state.config_records[RECORD_KEY_STATE]["max_weight"])
        weight = min(n, int(cap))
        update = [(reply.tensors[k].detach().float().cpu() - fit.tensors[k].float().cpu()).numpy() for k in sorted(fit.tensors)]
        clip = float(context.state.config_records[RECORD_KEY_STATE]["clipping_range"])
        self.clipped = int(sum(int((np.abs(u) * (weight / cap) > clip).sum()) for u in update))
        meta = {k: v for k, v in reply.meta.items() if k not in ("kind", "round", "src", "dst")}
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight, {"fedtune": json.dumps(meta)})
        return FlowerMessage(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def wrap_clients(config, clients: dict[int, ClientApp]) -> dict[int, ClientApp]:
    """The paradigm's client apps, each wrapped in a `SecAggClient` when ``secagg.enabled`` (else unchanged)."""
    if not config.secagg.enabled:
        return clients
    return {k: SecAggClient(app, k, config.seed) for k, app in clients.items()}
