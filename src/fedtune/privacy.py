"""Client-level differential privacy for the paradigms that average updates: DP-FedAvg and its accountant.

DP-FedAvg (McMahan et al., 2018): each sampled client's update (its adapter minus the global one) is clipped
to an L2 norm ``C`` (``privacy.clip``), and Gaussian noise of std ``z * C`` (``privacy.noise_multiplier``
``z``) goes on the sum of the clipped updates, which is divided by the number of clients sampled a round:

* ``privacy.dp: central``: the server clips every reply and adds the noise to the sum (`ClientDP.combine`);
* ``privacy.dp: local``: each client clips its own update and adds its share, noise of std ``z * C / sqrt(m)``
  for ``m`` sampled clients, so that the sum carries the same ``z * C`` (distributed DP, `LocalDPClient`); it
  protects the individual updates from the server only together with secure aggregation.

Adaptive clipping (Andrew et al., 2021), central only, with Flower's defaults: ``C`` starts at 0.1 and after
each round moves by ``C *= exp(-clip_lr * (b - target_quantile))``, where ``b`` is the fraction of updates
whose norm was at most ``C``, counted with Gaussian noise of std ``count_noise`` (default ``m / 20``); the
updates' noise multiplier is then ``(z**-2 - (2 count_noise)**-2) ** -0.5``, so that both releases together
cost what one Gaussian mechanism of multiplier ``z`` costs.

The privacy spent is computed by ``dp-accounting``'s RDP accountant: each round is a Gaussian mechanism of
multiplier ``z`` on a Poisson sample of rate ``clients_per_round / num_clients`` (the usual approximation of
sampling a fixed number of clients, as TensorFlow Federated does). With ``privacy.target_epsilon`` the
multiplier is calibrated by the same library so that the whole run spends that epsilon. Every evaluation
record and ``summary.json`` carry ``epsilon`` and ``delta`` (`ClientDP.spent`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import registry
from .grid import ClientApp, as_app
from .wire import Message

State = dict[str, torch.Tensor]

MODES = ("none", "central", "local")


@dataclass
class PrivacyConfig:
    """``privacy``: client-level differential privacy (DP-FedAvg) for the paradigms that average updates."""

    dp: Literal["none", "central", "local"] = "none"
    """`none`; `central` (the server clips every update and adds the noise to their sum) or `local` (each client clips and adds its share of the noise); see docs/privacy.md."""
    clip: float = 0.1
    """The L2 norm C every client update (adapter minus the global one) is clipped to; with `adaptive`, its starting value."""
    noise_multiplier: float = 1.0
    """z: the noise on the sum of the clipped updates has std z * C (0: clipping only, epsilon infinite). Ignored when `target_epsilon` is set."""
    target_epsilon: float | None = None
    """Calibrate `noise_multiplier` (dp-accounting) so that the whole run (federation.rounds) spends this epsilon at `delta`; null: use `noise_multiplier`."""
    delta: float = 1e-5
    """The delta of the (epsilon, delta) guarantee; keep it well below 1 / federation.num_clients."""
    adaptive: bool = False
    """Adaptive clipping (Andrew et al., 2021; central only): C follows the `target_quantile` of the update norms."""
    target_quantile: float = 0.5
    """Adaptive clipping: the fraction of updates that should be left unclipped."""
    clip_lr: float = 0.2
    """Adaptive clipping: the learning rate of the geometric update of C."""
    count_noise: float | None = None
    """Adaptive clipping: std of the noise on the count of unclipped updates; null: clients_per_round / 20 (Flower's default)."""


# --------------------------------------------------------------------------- accounting


def _event(noise_multiplier: float, sampling_rate: float, rounds: int):
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), rounds)


@contextlib.contextmanager
def _quiet():
    """dp-accounting's RDP accountant warns (through absl) for every fractional order below 2 that its series does
    not converge for at large sampling rates; it leaves those orders out, which is right, so the warnings are noise."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """The epsilon that `rounds` rounds of DP-FedAvg spend at `delta` (dp-accounting's RDP accountant).

    0 before the first round; infinite without noise.
    """
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    with _quiet():
        accountant.compose(_event(noise_multiplier, sampling_rate, rounds))
        return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def calibrate(target_epsilon: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier whose `rounds` rounds spend at most `target_epsilon` at `delta` (cached:
    the server and every local-DP client of a run ask for the same one)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    with _quiet():
        return float(dp_accounting.calibrate_dp_mechanism(
            RdpAccountant, lambda z: _event(z, sampling_rate, rounds), target_epsilon, delta,
            dp_accounting.LowerEndpointAndGuess(0.0, 1.0), tol=1e-4))


def update_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """The updates' multiplier when the clipped count is released too (Andrew et al., 2021; as Flower computes it)."""
    if noise_multiplier == 0:
        return 0.0
    if noise_multiplier >= 2 * count_noise:
        raise ValueError(f"privacy.noise_multiplier = {noise_multiplier:g} must be below 2 x privacy.count_noise "
                         f"({count_noise:g}) with adaptive clipping: raise privacy.count_noise (default "
                         "clients_per_round / 20) or lower the noise multiplier.")
    return (noise_multiplier ** -2 - (2 * count_noise) ** -2) ** -0.5


# --------------------------------------------------------------------------- the mechanism


def clip_rows(rows: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row scaled down to an L2 norm of at most `clip`: ``(clipped rows, their norms before)``."""
    norms = rows.norm(dim=1)
    return rows * torch.clamp(clip / norms.clamp_min(1e-30), max=1.0).unsqueeze(1), norms


def _flat(state: Mapping[str, torch.Tensor], keys: list[str], device) -> torch.Tensor:
    return torch.cat([state[k].to(device, torch.float32).reshape(-1) for k in keys])


def _unflat(row: torch.Tensor, like: Mapping[str, torch.Tensor], keys: list[str]) -> State:
    parts = row.split([like[k].numel() for k in keys])
    return {k: p.view(like[k].shape) for k, p in zip(keys, parts)}


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed % 2**63)


class ClientDP:
    """The server's side of DP-FedAvg for one run: clipping, noise, adaptive C, and the privacy spent.

    Args:
        mode: ``central`` or ``local`` (see the module docstring).
        clip: C (with ``adaptive``, its starting value).
        noise_multiplier: z, the multiplier the accountant charges.
        clients_per_round: m, the denominator of the mean (replies that fail still count: DP-FedAvg's fixed
            denominator, so one client's presence never changes the scale).
        num_clients: For the sampling rate m / num_clients.
        delta: The delta the epsilon is reported at.
        seed: Seed of the noise (round r draws from ``seed`` and r).
    """

    def __init__(self, mode: str, *, clip: float, noise_multiplier: float, clients_per_round: int, num_clients: int,
                 delta: float, seed: int, adaptive: bool = False, target_quantile: float = 0.5, clip_lr: float = 0.2,
                 count_noise: float | None = None) -> None:
        assert mode in ("central", "local"), mode
        self.mode = mode
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.m = clients_per_round
        self.sampling_rate = clients_per_round / num_clients
        self.delta = delta
        self.seed = seed
        self.adaptive = adaptive
        self.target_quantile = target_quantile
        self.clip_lr = clip_lr
        self.count_noise = (clients_per_round / 20 if count_noise is None else count_noise) if noise_multiplier > 0 else 0.0
        self.update_multiplier = (update_noise_multiplier(self.noise_multiplier, self.count_noise) if adaptive
                                  else self.noise_multiplier)
        self.rounds = 0
        """Rounds the mechanism ran (what the accountant charges)."""
        self.last: dict[str, Any] = {}

    def combine(self, global_state: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]]) -> State:
        """The private mean of `states`, as a global state (what the round's record says about it: `take`).

        Central: ``global + (sum of clipped updates + N(0, (z C)^2)) / m``; local: the clients clipped and
        noised, so ``global + sum of updates / m``. Counts one round for the accountant.
        """
        keys = list(global_state)
        device = global_state[keys[0]].device
        reference = _flat(global_state, keys, device)
        rows = torch.stack([_flat(s, keys, device) - reference for s in states])
        self.rounds += 1
        info: dict[str, Any] = {"dp_clip": self.clip}
        if self.mode == "local":
            total = rows.sum(0)
        else:
            clipped, norms = clip_rows(rows, self.clip)
            info["dp_clipped"] = int((norms > self.clip).sum())
            total = clipped.sum(0)
            gen = _generator(device, self.seed * 1_000_003 + self.rounds)
            std = self.update_multiplier * self.clip
            if std > 0:
                total = total + std * torch.randn(total.shape, generator=gen, device=device)
            if self.adaptive:
                unclipped = float((norms <= self.clip).sum())
                noise = self.count_noise * float(torch.randn((), generator=gen, device=device)) if self.count_noise else 0.0
                fraction = (unclipped + noise) / self.m
                self.clip *= math.exp(-self.clip_lr * (fraction - self.target_quantile))
        self.last = info
        return _unflat(reference + total / self.m, global_state, keys)

    def take(self) -> dict[str, Any]:
        """What the last `combine` reports for the round's record (``dp_clip``: the C it used; ``dp_clipped``:
        how many updates it clipped), once; ``{}`` when none ran since."""
        info, self.last = self.last, {}
        return info

    def spent(self) -> dict[str, float]:
        """``{"epsilon", "delta", "noise_multiplier"}`` after the rounds run so far."""
        return {"epsilon": epsilon(self.noise_multiplier, self.sampling_rate, self.rounds, self.delta),
                "delta": self.delta, "noise_multiplier": self.noise_multiplier}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON): the current C and the rounds charged."""
        return {"clip": self.clip, "rounds": self.rounds}

    def load(self, state: Mapping[str, Any]) -> None:
        self.clip, self.rounds = float(state["clip"]), int(state["rounds"])


def noise_multiplier_of(config) -> float:
    """The run's z: ``privacy.noise_multiplier``, or calibrated to ``privacy.target_epsilon``."""
    p, f = config.privacy, config.federation
    if p.target_epsilon is None:
        return p.noise_multiplier
    return calibrate(p.target_epsilon, f.clients_per_round / f.num_clients, f.rounds, p.delta)


def from_config(config) -> ClientDP | None:
    """The run's `ClientDP`, or None when ``privacy.dp`` is ``none``."""
    p, f = config.privacy, config.federation
    if p.dp == "none":
        return None
    return ClientDP(p.dp, clip=p.clip, noise_multiplier=noise_multiplier_of(config),
                    clients_per_round=f.clients_per_round, num_clients=f.num_clients, delta=p.delta, seed=config.seed,
                    adaptive=p.adaptive, target_quantile=p.target_quantile, clip_lr=p.clip_lr,
                    count_noise=p.count_noise)


# --------------------------------------------------------------------------- the client's share (local mode)


def privatize_update(sent: Mapping[str, torch.Tensor], returned: Mapping[str, torch.Tensor], *, clip: float,
                     std: float, generator: torch.Generator | None) -> State:
    """A client's reply made private: ``sent + clip(returned - sent, clip) + N(0, std^2)``, per tensor dtype.

    Only the tensors the server sent (the averaged adapter) are changed; anything else in the reply is kept.
    """
    keys = [k for k in returned if k in sent]
    device = returned[keys[0]].device
    base = _flat(sent, keys, device)
    clipped, _ = clip_rows((_flat(returned, keys, device) - base).unsqueeze(0), clip)
    row = clipped[0]
    if std > 0:
        row = row + std * torch.randn(row.shape, generator=generator, device=device)
    out = dict(returned)
    for k, t in _unflat(base + row, returned, keys).items():
        out[k] = t.to(returned[k].dtype)
    return out


class LocalDPClient(ClientApp):
    """A client that clips its update and adds its share of the noise before replying (``privacy.dp: local``)."""

    def __init__(self, app: ClientApp, node: int, *, clip: float, std: float, seed: int) -> None:
        self.app, self.node, self.clip, self.std, self.seed = app, node, clip, std, seed

    def __call__(self, msg: Message) -> Message:
        return self.start(msg)()

    def start(self, msg: Message) -> Callable[[], Message]:
        take = self.app.start(msg)

        def reply() -> Message:
            out = take()
            if out.meta.get("kind") == "error" or not out.tensors:
                return out
            rnd = int(msg.meta.get("round", 0))
            device = next(iter(out.tensors.values())).device
            gen = _generator(device, (self.seed * 1_000_003 + rnd) * 10_007 + self.node)
            return Message(privatize_update(msg.tensors, out.tensors, clip=self.clip, std=self.std, generator=gen),
                           dict(out.meta))

        return reply


def wrap_client(config, node: int, app) -> ClientApp:
    """`app` as this config's privacy makes it: a `LocalDPClient` with ``privacy.dp: local``, else itself."""
    p = config.privacy
    if p.dp != "local":
        return app
    std = noise_multiplier_of(config) * p.clip / math.sqrt(config.federation.clients_per_round)
    return LocalDPClient(as_app(app), node, clip=p.clip, std=std, seed=config.seed)


# --------------------------------------------------------------------------- config


def validate(config) -> None:
    p = config.privacy
    if p.dp == "none":
        return
    spec = registry.get(config.federation.paradigm)
    if not spec.averages_updates or spec.single_client:
        averaging = [n for n in registry.names() if registry.get(n).averages_updates and not registry.get(n).single_client]
        raise ValueError(f"privacy.dp = {p.dp!r} needs a paradigm that averages client updates ({', '.join(averaging)}), "
                         f"not federation.paradigm = {config.federation.paradigm!r}: set privacy.dp=none or change "
                         "the paradigm.")
    if config.federation.strategy == "scaffold":
        raise ValueError(f"privacy.dp = {p.dp!r} with federation.strategy = 'scaffold' is not supported: SCAFFOLD's "
                         "control variates travel beside the update unclipped. Choose fedavg, fedavgm, fedadam, "
                         "fedyogi or fedadagrad, or set privacy.dp=none.")
    if config.federation.aggregator != "mean":
        raise ValueError(f"privacy.dp = {p.dp!r} with federation.aggregator = {config.federation.aggregator!r}: DP-FedAvg's "
                         "guarantee is for the noisy mean of clipped updates (the clipping already bounds each "
                         "client), so set federation.aggregator=mean.")
    for name, value in (("clip", p.clip), ("clip_lr", p.clip_lr)):
        if not value > 0:
            raise ValueError(f"privacy.{name} = {value!r} must be positive.")
    if p.noise_multiplier < 0:
        raise ValueError(f"privacy.noise_multiplier = {p.noise_multiplier!r} must be >= 0 (0: clipping only).")
    if p.target_epsilon is not None and not p.target_epsilon > 0:
        raise ValueError(f"privacy.target_epsilon = {p.target_epsilon!r} must be positive, or null to use "
                         "privacy.noise_multiplier.")
    if not 0 < p.delta < 1:
        raise ValueError(f"privacy.delta = {p.delta!r} must be in (0, 1), well below 1 / federation.num_clients.")
    if not 0 < p.target_quantile < 1:
        raise ValueError(f"privacy.target_quantile = {p.target_quantile!r} must be in (0, 1).")
    if p.count_noise is not None and p.count_noise < 0:
        raise ValueError(f"privacy.count_noise = {p.count_noise!r} must be >= 0, or null for clients_per_round / 20.")
    if p.adaptive and p.dp != "central":
        raise ValueError("privacy.adaptive = true needs privacy.dp=central: with local DP every client clips at the "
                         "fixed privacy.clip.")
    if p.dp == "local" and config.runtime.batch_clients > 1:
        raise ValueError(f"privacy.dp = 'local' with runtime.batch_clients = {config.runtime.batch_clients}: the "
                         "clients add their noise one by one; set runtime.batch_clients=1.")
    if p.adaptive and p.target_epsilon is None and p.noise_multiplier > 0:
        f = config.federation
        update_noise_multiplier(p.noise_multiplier, f.clients_per_round / 20 if p.count_noise is None else p.count_noise)


registry.register_option(registry.Option("privacy", PrivacyConfig, validate, wrap_client=wrap_client))


# --------------------------------------------------------------------------- plot


def plot(rows: list[dict[str, Any]], path) -> bool:
    """``accuracy_vs_epsilon.png`` for a comparison whose runs report an epsilon: final accuracy against the
    epsilon spent (log scale; clipping without noise, epsilon infinite, at the right edge). Returns whether it
    drew one."""
    points = [r for r in rows if r.get("epsilon") is not None and r.get("accuracy") is not None]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["epsilon"] for r in points if math.isfinite(r["epsilon"])]
    right = max(finite) * 4 if finite else 10.0
    fig, ax = plt.subplots(figsize=(6, 4))
    for paradigm in dict.fromkeys(r["paradigm"] for r in points):
        mine = sorted((r for r in points if r["paradigm"] == paradigm),
                      key=lambda r: r["epsilon"] if math.isfinite(r["epsilon"]) else right)
        xs = [r["epsilon"] if math.isfinite(r["epsilon"]) else right for r in mine]
        ax.plot(xs, [r["accuracy"] for r in mine], "o-", label=paradigm)
    bases = [r["base_accuracy"] for r in points if r.get("base_accuracy") is not None]
    if bases:
        ax.axhline(bases[0], color="grey", linestyle=":", label="base model")
    ticks = sorted(set([x for x in finite] + [right]))
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:.3g}" if t != right else "inf" for t in ticks])
    ax.set(xlabel="epsilon (client-level, at the run's delta)", ylabel="final accuracy",
           title="Accuracy against privacy (DP-FedAvg)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.mkdir(parents=True, exist_ok=True)
    fig.savefig(path / "accuracy_vs_epsilon.png", dpi=120)
    plt.close(fig)
    return True
