"""Server aggregation strategies.

A strategy is a small object with explicit state and one method,
``aggregate(global_state, updates) -> new_global_state``. Every strategy starts
from the same average of the updates (`average`: the example-weighted mean `weighted_mean`, or a robust
average, `fedtune.robust`); FedAvgM and FedAdam then treat ``global - mean`` as a pseudo-gradient for a
server optimizer
(Reddi et al., "Adaptive Federated Optimization", 2021).

``state_dict()`` / ``load_state_dict()`` give a strategy's buffers as named tensors, so a
server checkpoint can resume with them (`fedtune.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .robust import Aggregator, combine

State = dict[str, torch.Tensor]


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """Weighted mean of tensor dicts with identical keys, computed in float32.

    Args:
        states: One mapping name -> tensor per client.
        weights: Non-negative weights (e.g. example counts), not all zero.
    """
    if not states:
        raise ValueError("weighted_mean needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative and not all zero, got {list(weights)}")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError(f"states have different keys: {sorted(keys ^ set(s))}")
    keys = list(states[0])
    shapes = [states[0][k].shape for k in keys]
    flats = [packed([s[k] for k in keys]) for s in states]
    if all(f is not None and f.device == flats[0].device and [s[k].shape for k in keys] == shapes
           for f, s in zip(flats, states)):
        # Every state is one buffer (a client's adapter copied off a GPU in one transfer, a mean from here):
        # one vectorised add per client over the whole buffer instead of one per tensor.
        acc = torch.zeros(flats[0].shape, dtype=torch.float32, device=flats[0].device)
        for f, w in zip(flats, weights):
            acc.add_(f, alpha=w / total)
        like = [states[0][k] for k in keys]
        return dict(zip(keys, (part.view(t.shape) for part, t in zip(acc.split([t.numel() for t in like]), like))))
    acc = [torch.zeros_like(states[0][k], dtype=torch.float32) for k in keys]
    for s, w in zip(states, weights):
        # One fused call per client over all its tensors (hundreds of adapter tensors per client).
        torch._foreach_add_(acc, [s[k].to(a.device, torch.float32) for k, a in zip(keys, acc)], alpha=w / total)
    return dict(zip(keys, acc))


def packed(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D view of one buffer of which `tensors` are consecutive contiguous parts, in order; else None."""
    if not tensors:
        return None
    first = tensors[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (t.dtype != first.dtype or t.device != first.device or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset):
            return None
        offset += t.numel()
    return first.as_strided((offset - first.storage_offset(),), (1,))


Update = tuple[Mapping[str, torch.Tensor], float]  # (client state, number of examples)


def average(global_state: Mapping[str, torch.Tensor], updates: Sequence[Update], agg: Aggregator | None) -> State:
    """The clients' average every strategy starts from: the weighted mean, or the robust average that
    ``federation.aggregator`` names (`fedtune.robust`)."""
    states, weights = [s for s, _ in updates], [n for _, n in updates]
    if agg is None or agg.kind == "mean":
        return weighted_mean(states, weights)
    return combine(global_state, states, weights, agg)


class FedAvg:
    """FedAvg (McMahan et al., 2017): the new global state is the example-weighted mean."""

    name = "fedavg"
    aggregator: Aggregator | None = None
    """The average of the updates (`average`); None: the weighted mean."""

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        mean = average(global_state, updates, self.aggregator)
        return {k: v.to(global_state[k].device, global_state[k].dtype) for k, v in mean.items()}

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_buffers(self, state, ())


class FedAvgM:
    """FedAvg with server momentum (Hsu et al., 2019): v = beta * v + (w - mean); w -= lr * v."""

    name = "fedavgm"
    DEFAULT_SERVER_LR = 1.0
    """``federation.server_lr`` when unset."""

    def __init__(self, server_lr: float = DEFAULT_SERVER_LR, momentum: float = 0.9) -> None:
        self.server_lr = server_lr
        self.momentum = momentum
        self.velocity: State = {}
        self.aggregator: Aggregator | None = None

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        mean = average(global_state, updates, self.aggregator)
        new: State = {}
        for k, w in global_state.items():
            delta = w.float() - mean[k].to(w.device)
            v = self.velocity.get(k)
            v = delta if v is None else v.mul_(self.momentum).add_(delta)
            self.velocity[k] = v
            new[k] = (w.float() - self.server_lr * v).to(w.dtype)
        return new

    def state_dict(self) -> State:
        return _buffers(self, ("velocity",))

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_buffers(self, state, ("velocity",))


class FedAdam:
    """FedAdam (Reddi et al., 2021): Adam on the server with the pseudo-gradient mean - w."""

    name = "fedadam"
    DEFAULT_SERVER_LR = 1e-3
    """``federation.server_lr`` when unset (the class and `make_strategy` both use this one value)."""

    def __init__(self, server_lr: float = DEFAULT_SERVER_LR, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: State = {}
        self.v: State = {}
        self.aggregator: Aggregator | None = None

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        mean = average(global_state, updates, self.aggregator)
        new: State = {}
        for k, w in global_state.items():
            g = mean[k].to(w.device) - w.float()
            m = self.m.get(k, torch.zeros_like(g)).mul_(self.beta1).add_(g, alpha=1 - self.beta1)
            v = self.v.get(k, torch.zeros_like(g)).mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            self.m[k], self.v[k] = m, v
            new[k] = (w.float() + self.server_lr * m / (v.sqrt() + self.tau)).to(w.dtype)
        return new

    def state_dict(self) -> State:
        return _buffers(self, ("m", "v"))

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_buffers(self, state, ("m", "v"))


class FedYogi:
    """FedYogi (Reddi et al., 2021, Algorithm 2): FedAdam with Yogi's additive second moment,
    v = v - (1 - beta2) g^2 sign(v - g^2), which grows or shrinks v by at most (1 - beta2) g^2 a round.

    Buffers start at zero, as in Flower's FedYogi (the paper starts v at tau^2 or more; from zero the first
    round's v is (1 - beta2) g^2, as FedAdam's).
    """

    name = "fedyogi"
    DEFAULT_SERVER_LR = 1e-3
    """``federation.server_lr`` when unset (FedAdam's; Flower's FedYogi uses 1e-2 on full models)."""

    def __init__(self, server_lr: float = DEFAULT_SERVER_LR, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: State = {}
        self.v: State = {}
        self.aggregator: Aggregator | None = None

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        def second_moment(v: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
            return v.sub_((1 - self.beta2) * g2 * torch.sign(v - g2))
        return _adaptive_step(self, global_state, updates, second_moment)

    def state_dict(self) -> State:
        return _buffers(self, ("m", "v"))

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_buffers(self, state, ("m", "v"))


class FedAdagrad:
    """FedAdagrad (Reddi et al., 2021, Algorithm 2): v = v + g^2, the sum of every round's squared
    pseudo-gradient; m = beta1 m + (1 - beta1) g (``federation.server_momentum``; 0 gives Flower's FedAdagrad,
    which has no momentum); w += lr m / (sqrt(v) + tau)."""

    name = "fedadagrad"
    DEFAULT_SERVER_LR = 1e-2
    """``federation.server_lr`` when unset: ten times FedAdam's, since v only grows (Flower's is 1e-1)."""

    def __init__(self, server_lr: float = DEFAULT_SERVER_LR, beta1: float = 0.9, tau: float = 1e-9) -> None:
        self.server_lr, self.beta1, self.tau = server_lr, beta1, tau
        self.m: State = {}
        self.v: State = {}
        self.aggregator: Aggregator | None = None

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        return _adaptive_step(self, global_state, updates, lambda v, g2: v.add_(g2))

    def state_dict(self) -> State:
        return _buffers(self, ("m", "v"))

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_buffers(self, state, ("m", "v"))


def _adaptive_step(strategy, global_state: State, updates: Sequence[Update], second_moment) -> State:
    """One round of an adaptive server optimizer (Reddi et al., 2021, Algorithm 2) with pseudo-gradient
    g = mean - w: m = beta1 m + (1 - beta1) g; v = second_moment(v, g^2) (in place); w += lr m / (sqrt(v) + tau)."""
    s = strategy
    mean = average(global_state, updates, s.aggregator)
    new: State = {}
    for k, w in global_state.items():
        g = mean[k].to(w.device) - w.float()
        m = s.m.get(k, torch.zeros_like(g)).mul_(s.beta1).add_(g, alpha=1 - s.beta1)
        v = second_moment(s.v.get(k, torch.zeros_like(g)), g * g)
        s.m[k], s.v[k] = m, v
        new[k] = (w.float() + s.server_lr * m / (v.sqrt() + s.tau)).to(w.dtype)
    return new


CONTROL = "scaffold/"
"""Prefix of the control-variate tensors in SCAFFOLD's messages: the server's ``c`` goes down beside the
adapter, each client's change ``delta c_i`` comes back beside its adapter (the payload doubles)."""


class Scaffold:
    """SCAFFOLD (Karimireddy et al., 2020, Algorithm 1), the server side.

    Clients correct every local gradient by ``c - c_i`` and reply their adapter ``y_i`` and the change of
    their control variate ``delta c_i`` (`fedtune.scaffold`). The server moves
    ``w += lr * (mean(y) - w)`` (the example-weighted mean, or the robust average; the paper's uniform
    mean is the equal-sizes case) and ``c += (1 / N) * sum(delta c_i)`` over the round's clients, N being
    all clients (``federation.num_clients``).
    """

    name = "scaffold"
    DEFAULT_SERVER_LR = 1.0
    """``federation.server_lr`` when unset (the paper's eta_g = 1: the new global is the clients' mean)."""

    def __init__(self, server_lr: float = DEFAULT_SERVER_LR, num_clients: int = 1) -> None:
        if num_clients < 1:
            raise ValueError(f"SCAFFOLD needs num_clients >= 1, got {num_clients}")
        self.server_lr, self.num_clients = server_lr, num_clients
        self.c: State = {}
        self.aggregator: Aggregator | None = None

    def payload(self, global_state: State) -> State:
        """What goes down to a client: the global adapter and the server's control variate (zero at first)."""
        return {**global_state, **{CONTROL + k: self.c[k] if k in self.c else torch.zeros_like(w, dtype=torch.float32)
                                   for k, w in global_state.items()}}

    def reply_spec(self, spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict:
        """What a client's reply holds: the adapter and one float32 ``delta c_i`` per adapter tensor."""
        return {**spec, **{CONTROL + k: (shape, torch.float32) for k, (shape, _) in spec.items()}}

    def aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        adapters = [({k: s[k] for k in global_state}, n) for s, n in updates]
        mean = average(global_state, adapters, self.aggregator)
        new: State = {}
        for k, w in global_state.items():
            new[k] = (w.float() + self.server_lr * (mean[k].to(w.device) - w.float())).to(w.dtype)
            c = self.c.get(k, torch.zeros_like(w, dtype=torch.float32))
            total = torch.zeros_like(c)
            for s, _ in updates:
                total.add_(s[CONTROL + k].to(c.device, torch.float32))
            self.c[k] = c + total / self.num_clients
        return new

    def state_dict(self) -> State:
        return _buffers(self, ("c",))

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_buffers(self, state, ("c",))


def _buffers(strategy, names: tuple[str, ...]) -> State:
    """The strategy's buffer dicts flattened to ``"<buffer>:<key>" -> tensor`` (copies)."""
    return {f"{b}:{k}": t.detach().clone() for b in names for k, t in getattr(strategy, b).items()}


def _load_buffers(strategy, state: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> None:
    """Inverse of `_buffers`; a buffer the strategy does not have is an error, never ignored."""
    loaded: dict[str, State] = {b: {} for b in names}
    for key, t in state.items():
        b, _, k = key.partition(":")
        if b not in loaded:
            raise ValueError(f"{strategy.name} has no buffer {b!r} (saved key {key!r}): the checkpoint is of "
                             "another strategy")
        loaded[b][k] = t.clone()
    for b, buf in loaded.items():
        setattr(strategy, b, buf)


def make_strategy(name: str, server_lr: float | None, momentum: float, aggregator: Aggregator | None = None,
                  num_clients: int | None = None):
    """Build a strategy from its config name (``federation.strategy``); ``server_lr=None`` picks its default.

    ``aggregator`` (``federation.aggregator`` and its parameters) is the average the strategy starts from.
    ``num_clients`` (all clients, ``federation.num_clients``) is SCAFFOLD's N; only a paradigm whose clients
    keep control variates (fedpeft, fedprox) passes it.
    """
    if name == "fedavg":
        strategy = FedAvg()
    elif name == "fedavgm":
        strategy = FedAvgM(server_lr=FedAvgM.DEFAULT_SERVER_LR if server_lr is None else server_lr, momentum=momentum)
    elif name == "fedadam":
        strategy = FedAdam(server_lr=FedAdam.DEFAULT_SERVER_LR if server_lr is None else server_lr, beta1=momentum)
    elif name == "fedyogi":
        strategy = FedYogi(server_lr=FedYogi.DEFAULT_SERVER_LR if server_lr is None else server_lr, beta1=momentum)
    elif name == "fedadagrad":
        strategy = FedAdagrad(server_lr=FedAdagrad.DEFAULT_SERVER_LR if server_lr is None else server_lr,
                              beta1=momentum)
    elif name == "scaffold":
        if num_clients is None:
            raise ValueError("federation.strategy = 'scaffold' needs clients that keep control variates: use it "
                             "with federation.paradigm fedpeft or fedprox.")
        strategy = Scaffold(server_lr=Scaffold.DEFAULT_SERVER_LR if server_lr is None else server_lr,
                            num_clients=num_clients)
    else:
        raise ValueError(f"federation.strategy = {name!r} is not one of fedavg, fedavgm, fedadam, fedyogi, "
                         "fedadagrad, scaffold")
    strategy.aggregator = aggregator
    return strategy


def aggregator_of(federation) -> Aggregator:
    """The `Aggregator` a config's ``federation`` section describes."""
    f = federation
    return Aggregator(f.aggregator, f.norm_bound, f.trim_fraction, f.krum_f, f.krum_m, f.max_weight)
