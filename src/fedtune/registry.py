"""The paradigm registry: each paradigm module declares itself here, with one `register` call.

A `Paradigm` says everything the layers around it need to know, so that nothing outside
``paradigms/`` branches on a paradigm's name: its config section, what a client may see of the
model, whether it checkpoints, whether its clients keep state between rounds, what the runtimes
must provide. The experiment layer looks a paradigm up by ``federation.paradigm``, builds its
clients and runs its server loop; a new paradigm is one new module plus its import in
``paradigms/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ACCESS = ("white", "gray", "black")
"""What a client may see of the model: weights and gradients, a compressed emulator, or only an inference API."""


@dataclass(frozen=True)
class Paradigm:
    """One federated fine-tuning framework, as the rest of fedtune sees it.

    Attributes:
        name: The value of ``federation.paradigm``.
        title: How the console and reports name it ("FedLLM", "KD-FedLLM", ...).
        summary: One line for ``--help`` and the docs.
        make_clients: ``(ctx) -> {node id: ClientApp}``: every client app of a run.
        run_server: ``(ctx, grid) -> evaluations``: the server's whole run; leaves the final adapter in
            ``ctx.model`` and on disk.
        access: ``white``, ``gray`` or ``black`` (see `ACCESS`).
        backprop: Whether clients backpropagate.
        section: ``(name, dataclass)`` of the config section the paradigm reads, or None; the config
            loader adds it to every config (several paradigms may share one section).
        validate: ``(config) -> None``: checks across sections, raising `ValueError` that names the field.
        checkpoints: ``(config) -> bool``: whether the server state of this run is checkpointed.
        strategy_label: What the report shows as the aggregation (None: ``federation.strategy``).
        single_client: The centralized baseline: one client holds all training data (no federation).
        stateful_clients: Clients keep state between rounds (each must stay in one process).
        held_data: ``(config, task, train_rows, train_examples) -> (held indices, {name: examples})``: training
            rows the data layer holds back from every client (after partitioning) and hands the paradigm
            as ``ctx.data.extras`` (KD's public prompts and the server's validation split), or None.
        long_exchanges: One client reply spans the client's whole round of per-step traffic with a
            service (split learning): networked runtimes wait their round timeout for it.
        batched: ``(clients) -> run_batch`` for ``runtime.batch_clients > 1`` (several clients in one pass), or None.
        needs: Why a runtime cannot run this config, or None: ``(config, runtime) -> str | None`` with
            runtime ``local``, ``flower`` or ``distributed``.
        averages_updates: The server averages the clients' adapter updates through `rounds.aggregate` (what
            client-level DP and the update attacks act on).
        lora_ranks: Clients may train LoRA ranks of their own, aggregated rank-aware (``peft.client_ranks``,
            ``peft.aggregation``; `fedtune.paradigms.fedpeft_ranks`).
        update_link: Its clients' adapter updates go through update compression (``compression.*``) and
            may carry SCAFFOLD's control variates (`fedtune.client_state`).
    """

    name: str
    title: str
    summary: str
    make_clients: Callable[[Any], dict[int, Any]]
    run_server: Callable[[Any, Any], list[dict[str, Any]]]
    access: str = "white"
    backprop: bool = True
    section: tuple[str, type] | None = None
    validate: Callable[[Any], None] | None = None
    checkpoints: Callable[[Any], bool] = lambda config: config.runtime.checkpoint
    strategy_label: str | None = None
    single_client: bool = False
    stateful_clients: bool = False
    held_data: Callable[[Any, Any, list, list], tuple[set[int], dict[str, list]]] | None = None
    long_exchanges: bool = False
    batched: Callable[[dict[int, Any]], Callable] | None = None
    needs: Callable[[Any, str], str | None] | None = None
    averages_updates: bool = False
    lora_ranks: bool = False
    update_link: bool = False

    def __post_init__(self) -> None:
        assert self.access in ACCESS, f"paradigm {self.name}: access {self.access!r} is not one of {ACCESS}"

    def refusal(self, config, runtime: str) -> str | None:
        """Why `runtime` cannot run `config` with this paradigm (the fix included), or None."""
        return self.needs(config, runtime) if self.needs is not None else None


_PARADIGMS: dict[str, Paradigm] = {}


def register(paradigm: Paradigm) -> Paradigm:
    """Add `paradigm` to the registry (a module calls this once per name it provides)."""
    assert paradigm.name not in _PARADIGMS, f"paradigm {paradigm.name!r} is registered twice"
    _PARADIGMS[paradigm.name] = paradigm
    return paradigm


def names() -> tuple[str, ...]:
    """Every registered ``federation.paradigm`` value, in registration order."""
    return tuple(_PARADIGMS)


def get(name: str) -> Paradigm:
    """The paradigm called `name`; ValueError naming the allowed values otherwise."""
    try:
        return _PARADIGMS[name]
    except KeyError:
        raise ValueError(f"federation.paradigm = {name!r} is not a paradigm: choose one of "
                         f"{', '.join(map(repr, _PARADIGMS))}.") from None


@dataclass(frozen=True)
class Option:
    """A config section that is not a paradigm's: a feature several paradigms can use (privacy, attacks,
    safety, compression, tracking, ...). Its module declares it with `register_option`, so that the config
    schema, ``--help`` and the configuration reference pick it up without config.py knowing it.

    Attributes:
        name: The section's key in the config file (``privacy``, ``attack``, ...).
        cls: The section's dataclass (field docstrings become ``--help``).
        validate: ``(config) -> None``: checks across sections, raising `ValueError` that names the field.
        wrap_client: ``(config, node, app) -> app``: the client app as the feature makes it (local DP's noise, a
            simulated attack), or None; `wrap_clients` applies every feature's in registration order.
    """

    name: str
    cls: type
    validate: Callable[[Any], None] | None = None
    wrap_client: Callable[[Any, int, Any], Any] | None = None


_OPTIONS: dict[str, Option] = {}


def register_option(option: Option) -> Option:
    """Add a feature's config section (a module calls this once per section it owns)."""
    assert option.name not in _OPTIONS, f"config section {option.name!r} is registered twice"
    _OPTIONS[option.name] = option
    return option


def options() -> tuple[Option, ...]:
    """Every registered feature section, in registration order."""
    return tuple(_OPTIONS.values())


def wrap_clients(config, apps: dict[int, Any]) -> dict[int, Any]:
    """Every client app of a run as the features make it (`Option.wrap_client`), the last registered outermost."""
    for o in _OPTIONS.values():
        if o.wrap_client is not None:
            apps = {node: o.wrap_client(config, node, app) for node, app in apps.items()}
    return apps


def sections() -> dict[str, type]:
    """Config section name -> its dataclass, over every registered paradigm and feature (each section once)."""
    out: dict[str, type] = {}
    for p in _PARADIGMS.values():
        if p.section is not None:
            name, cls = p.section
            assert out.get(name, cls) is cls, f"config section {name!r} is declared with two classes"
            out[name] = cls
    for o in _OPTIONS.values():
        assert o.name not in out, f"config section {o.name!r} is declared by a paradigm and a feature"
        out[o.name] = o.cls
    return out
