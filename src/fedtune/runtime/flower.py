"""Flower runtime: the same experiment with the server and every client on different machines.

The fed server is a Flower ``ServerApp`` (`server_app`) and each client a ``ClientApp``
(`client_app`) on a SuperNode, started with Flower's own tools (``flower-superlink``,
``flower-supernode``, ``flwr run``; see README "Deploy across machines"). Paradigm code is
unchanged: the server runs `experiment.run` with a grid factory that returns a `FlowerGrid`,
so it ends with the same run folder as a simulation.

What travels: every fedtune `Message` is carried as its `wire.encode` bytes (safetensors with a
JSON header, never a pickle) in one Flower ``Array`` of custom stype `STYPE`, beside a
``ConfigRecord`` holding the resolved experiment config (so a client needs no copy of the YAML).
Replies are decoded with `wire.decode(max_bytes=...)`.

Which client is which: fedtune's client ids are small ints (the partitions), Flower's node ids
are random 64-bit numbers. At startup `FlowerGrid` asks every connected node for its
``partition-id`` (its ``--node-config``), so the paradigm's seeded sampling picks the same
partitions as in the local runtime. A node that does not answer within the timeout, or answers
with an error, becomes `grid.error_reply`, and the paradigm drops it from that round.

A client's data: node config ``partition-id=K num-partitions=N`` takes partition K of the
configured data (how tests compare with the local runtime); ``data-path=/srv/mine.jsonl`` makes
every row of that file this client's training data and nothing else is read. ``config=/srv/exp.yaml``
makes the node refuse any experiment but that one.

Split learning (``federation.paradigm: split``) runs with ``runtime.split_server``: Flower carries one
message each way per client-round (``split_fit_ins`` with the global bottom adapter, ``fit_res`` with the
client's) and the fed server's FedAvg of the bottom adapters; each step's activations and gradients go
over the client's own gRPC stream to the main-server service (`fedtune.runtime.split_service`). A
``split_fit_ins`` reply comes only after the client's whole round, so it waits up to
``split-round-timeout`` rather than ``reply-timeout``.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MessageType, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid as FlowerServerGrid
from flwr.serverapp import ServerApp

from .. import config as cfg
from .. import registry
from ..grid import SequentialStream, error_reply, is_error
from ..progress import Bars
from ..wire import DEFAULT_MAX_BYTES, Message, WireError, decode, encode

# With Flower's default isolation a fresh ClientApp process runs every message, so the model, data and
# training stack (`fedtune.experiment`: transformers, peft, matplotlib; ~12 s to import on a busy CPU)
# are imported inside the functions that need them, and the startup query is answered without them.
# `fedtune.runtime.flower_worker` instead serves all of a SuperNode's messages from one process.

STYPE = "fedtune.wire"
"""Flower ``Array.stype`` of a payload that is one `wire.encode`d message (safetensors bytes)."""

HELLO = "hello"
"""Kind of the startup query that asks a node for its fedtune client id."""

STATE_KEY = "fedtune.client_state"
"""Key in Flower's per-node ``Context.state`` under which a stateful client app's state persists."""

INFO = 20  # logging.INFO, for flwr's logger
WARNING = 30  # logging.WARNING


# --------------------------------------------------------------------------- packing


def pack(msg: Message, config_yaml: str | None = None) -> RecordDict:
    """A fedtune message as Flower records: its wire bytes (+ the run's config, server to client)."""
    payload = encode(msg)
    records: dict[str, Any] = {"fedtune": ArrayRecord({"message": Array("uint8", (len(payload),), STYPE, payload)})}
    if config_yaml is not None:
        records["run"] = ConfigRecord({"config": config_yaml})
    return RecordDict(records)


def unpack(content: RecordDict, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Message, str | None]:
    """The fedtune message (validated by `wire.decode`) and the config YAML, if sent, from Flower records."""
    try:
        array = content["fedtune"]["message"]
    except KeyError:
        raise WireError("Flower message has no fedtune payload (record 'fedtune', array 'message')") from None
    if array.stype != STYPE:
        raise WireError(f"fedtune payload has stype {array.stype!r}, expected {STYPE!r}")
    run = content.get("run")
    return decode(array.data, max_bytes=max_bytes), (str(run["config"]) if run is not None else None)


# --------------------------------------------------------------------------- server side


@dataclass
class FlowerSettings:
    """How the server side waits on the network (``flwr run --run-config`` keys in brackets)."""

    reply_timeout: float = 600.0
    """[reply-timeout] Seconds to wait for a round's replies; a node still silent then has failed."""
    connect_timeout: float = 120.0
    """[connect-timeout] Seconds to wait at startup for federation.num_clients nodes to connect."""
    split_round_timeout: float = 3600.0
    """[split-round-timeout] Seconds to wait for a split client's reply to ``split_fit_ins``: its whole round of
    steps streamed to the split server (default: that stream's own deadline, ``FEDTUNE_SPLIT_TIMEOUT``'s 3600)."""
    max_bytes: int = DEFAULT_MAX_BYTES
    """[max-mb] Largest reply accepted (in MiB on the command line)."""

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> FlowerSettings:
        s = cls()
        for key, attr in (("reply-timeout", "reply_timeout"), ("connect-timeout", "connect_timeout"),
                          ("split-round-timeout", "split_round_timeout")):
            if key in rc:
                value = float(rc[key])
                if not value > 0:
                    raise ValueError(f"run config {key} = {rc[key]!r} must be a positive number of seconds.")
                setattr(s, attr, value)
        if "max-mb" in rc:
            mb = int(rc["max-mb"])
            if mb <= 0:
                raise ValueError(f"run config max-mb = {rc['max-mb']!r} must be a positive number of MiB.")
            s.max_bytes = mb * 1024**2
        return s


class FlowerGrid(SequentialStream):
    """fedtune's `Grid` over a Flower ServerApp grid.

    A call waits ``reply-timeout`` for its replies unless it says otherwise; for a paradigm whose
    replies span a client's whole round of per-step traffic with a service (`Paradigm.long_exchanges`,
    split learning) the default is ``split-round-timeout``.

    Args:
        grid: The ``flwr.serverapp.Grid`` the ServerApp's main function received.
        config: The run's config (sent to the clients with every message).
        settings: Timeouts and size limit.
    """

    parallel = True  # a round's messages go out together; the clients train at the same time

    def __init__(self, grid: FlowerServerGrid, config: cfg.Config, settings: FlowerSettings | None = None) -> None:
        self.grid = grid
        self.settings = settings or FlowerSettings()
        self.config_yaml = cfg.to_yaml(config)
        self.num_clients = config.federation.num_clients
        long = registry.get(config.federation.paradigm).long_exchanges
        self.timeout = self.settings.split_round_timeout if long else self.settings.reply_timeout
        self.to_flower: dict[int, int] = self._discover()

    def node_ids(self) -> list[int]:
        # Every client of the experiment, connected or not: sampling then picks the clients a simulation
        # picks, and one whose node is absent gets an error reply (a dropout in the metrics).
        return list(range(self.num_clients))

    def _discover(self) -> dict[int, int]:
        """Wait for the nodes, then map each one's ``partition-id`` to its Flower node id."""
        deadline = time.monotonic() + self.settings.connect_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.num_clients or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if not nodes:
            raise RuntimeError(f"no SuperNode connected within connect-timeout = {self.settings.connect_timeout:g} s; "
                               "start the SuperNodes (flower-supernode --superlink HOST:PORT ...) or raise it.")
        hello = [(n, Message({}, {"kind": HELLO})) for n in nodes]
        mapping: dict[int, int] = {}
        for flower_id, reply in zip(nodes, self._exchange(hello, self.settings.reply_timeout)):
            if is_error(reply):
                log(INFO, "node %d did not identify itself and is left out: %s", flower_id, reply.meta.get("error"))
                continue
            pid = reply.meta.get("partition_id")
            if not isinstance(pid, int) or not 0 <= pid < self.num_clients:
                log(INFO, "node %d has partition-id=%r, not in 0..%d (federation.num_clients = %d): left out",
                    flower_id, pid, self.num_clients - 1, self.num_clients)
                continue
            if pid in mapping:
                # A misconfigured (or hostile) node must not stop the run: the node that answered first keeps it.
                log(WARNING, "node %d claims partition-id=%d, which node %d already has: node %d is left out; give "
                    "each node its own --node-config partition-id", flower_id, pid, mapping[pid], flower_id)
                continue
            mapping[pid] = flower_id
        if len(mapping) < self.num_clients:
            log(INFO, "only %d of %d expected nodes identified themselves: %s", len(mapping), self.num_clients,
                sorted(mapping))
        if not mapping:
            raise RuntimeError("no SuperNode answered the startup query; see the SuperNodes' logs.")
        log(INFO, "fedtune clients -> Flower nodes: %s", mapping)
        return mapping

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        replies: list[Message | None] = [None] * len(messages)
        # Replies are matched to messages by sender, so each batch addresses a node at most once.
        pending = list(enumerate(messages))
        while pending:
            batch, rest, seen = [], [], set()
            for i, m in pending:
                (rest if int(m.meta["dst"]) in seen else batch).append((i, m))
                seen.add(int(m.meta["dst"]))
            routed = []
            for i, m in batch:
                dst = int(m.meta["dst"])
                if dst in self.to_flower:
                    routed.append((i, dst))
                else:
                    replies[i] = error_reply(dst, f"no SuperNode with partition-id={dst} is connected "
                                                  f"(connected: {sorted(self.to_flower)})")
            got = self._exchange([(self.to_flower[dst], messages[i]) for i, dst in routed], timeout or self.timeout)
            for (i, dst), reply in zip(routed, got):
                reply.meta["src"] = dst
                replies[i] = reply
            pending = rest
        return replies  # type: ignore[return-value]

    def _exchange(self, pairs: list[tuple[int, Message]], timeout: float) -> list[Message]:
        """Send each message to its Flower node; one reply per message, `error_reply` where none came."""
        if not pairs:
            return []
        out = []
        for node, m in pairs:
            content = pack(m, self.config_yaml)
            kind = MessageType.QUERY if m.meta.get("kind") == HELLO else MessageType.TRAIN
            out.append(FlowerMessage(content, dst_node_id=node, message_type=kind, ttl=timeout))
        started = time.monotonic()
        by_node = {r.metadata.src_node_id: r for r in self.grid.send_and_receive(out, timeout=timeout)}
        log(INFO, "%d messages, %d replies in %.1f s", len(out), len(by_node), time.monotonic() - started)
        result = []
        for node, m in pairs:
            dst = m.meta.get("dst", node)
            reply = by_node.get(node)
            if reply is None:
                result.append(error_reply(dst, f"no reply from Flower node {node} within {timeout:g} s"))
            elif reply.has_error():
                result.append(error_reply(dst, f"Flower error {reply.error.code}: {reply.error.reason}"))
            else:
                try:
                    result.append(unpack(reply.content, self.settings.max_bytes)[0])
                except (WireError, KeyError) as err:
                    result.append(error_reply(dst, f"rejected reply: {err}"))
        return result


def check_runnable(c: cfg.Config) -> None:
    """Refuse, with the fix, an experiment the Flower runtime cannot run (as its paradigm declares)."""
    refusal = registry.get(c.federation.paradigm).refusal(c, "flower")
    if refusal:
        raise ValueError(refusal)

server_app = ServerApp()


@server_app.main()
def _server_main(grid: FlowerServerGrid, context: Context) -> None:
    """``flwr run``'s entry point: run config ``config`` (YAML path) and ``out`` (run folder) name the experiment."""
    from .. import experiment

    rc = dict(context.run_config)
    if not rc.get("config"):
        raise ValueError("flwr run needs the experiment: --run-config \"config='path/to/experiment.yaml'\"")
    c = experiment.load(Path(str(rc["config"])))
    check_runnable(c)
    settings = FlowerSettings.from_run_config(rc)

    def flower_grid(ctx, paradigm) -> FlowerGrid:
        return FlowerGrid(grid, ctx.config, settings)

    summary = experiment.run(c, rc.get("out") or None, quiet=True, grid_factory=flower_grid)
    log(INFO, "fedtune run finished: accuracy %s", summary.get("accuracy"))


# --------------------------------------------------------------------------- client side


def partition_id(node_config: dict[str, Any]) -> int:
    """This node's fedtune client id (its ``partition-id`` node config)."""
    if "partition-id" not in node_config:
        raise ValueError("this SuperNode has no partition-id: start it with --node-config \"partition-id=K ...\" "
                         "(K = its client id, 0..federation.num_clients-1)")
    return int(node_config["partition-id"])


def own_data(c: cfg.Config, tokenizer, path: str, node: int):
    """The `experiment.Prepared` data of a client whose private data is the file at `path`: all of it trains."""
    from .. import experiment
    from ..data.sources import load_records, require_fields

    d = c.data
    rows = load_records(path)
    task = experiment.build_task(d, tokenizer)
    target = d.label_field if d.task == "classification" else d.response_field
    require_fields(rows, sorted(set(task.fields) | {target}), path)
    train = [task.encode(r, target, where=f"{path} row {i + 1}") for i, r in enumerate(rows)]
    if not train:
        raise ValueError(f"data-path {path!r} has no rows: this client has nothing to train on.")
    extras: dict = {}
    spec = registry.get(c.federation.paradigm)
    refusal = spec.refusal(c, "flower-data-path")
    if refusal:
        raise ValueError(refusal)
    if spec.held_data is not None:
        # What the paradigm needs beside the node's rows (KD's public prompts, from their file); the node's own
        # rows all train here.
        extras = spec.held_data(c, task, [], [])[1]
    # make_clients builds one app per partition; only this node's (index `node`) is used.
    everything = list(range(len(train)))
    return experiment.Prepared(task, train, [], [everything] * (node + 1), ["-"] * len(train), extras)


def build_client(config_yaml: str, node_config: dict[str, Any]):
    """This node's client app and its model, built exactly as the local runtime builds them (same seeds,
    same partition)."""
    from .. import experiment

    c = cfg.from_dict(yaml.safe_load(config_yaml))
    node = partition_id(node_config)
    if node_config.get("data-path"):
        path = str(node_config["data-path"])

        def prepare(c, tokenizer, bars):
            return own_data(c, tokenizer, path, node)
    else:
        parts = int(node_config.get("num-partitions", c.federation.num_clients))
        if parts != c.federation.num_clients or not 0 <= node < parts:
            raise ValueError(f"node config partition-id={node} num-partitions={parts} does not fit the experiment's "
                             f"federation.num_clients = {c.federation.num_clients}: use num-partitions="
                             f"{c.federation.num_clients} and a partition-id below it, or data-path=FILE.")
        prepare = None
    bars = Bars(quiet=True)
    model, tokenizer, data, device = experiment.setup(c, bars, prepare)
    ctx = experiment.context(c, model, tokenizer, data, device, bars, log=lambda record: None,
                             score=lambda: float("nan"), path=Path("."))
    try:
        return registry.wrap_clients(c, registry.get(c.federation.paradigm).make_clients(ctx))[node], ctx
    except BaseException:
        ctx.close()
        model.unload()
        raise


class NodeClient:
    """This process's client app for the Flower run it serves now, built once per run (config, node config).

    A process serves many messages when the SuperNode's tasks go to `fedtune.runtime.flower_worker`; a new
    run gets a new app even with the same config, so nothing of an earlier run (e.g. a KD client's private
    adapter) leaks into it: within a run, Flower's node state is what carries a client's state. Building
    the next run's app first releases the last one's context and adapter (the base stays cached).
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.app = None
        self.ctx = None

    def get(self, config_yaml: str, node_config: dict[str, Any], run_id: int):
        key = (run_id, config_yaml, tuple(sorted((k, str(v)) for k, v in node_config.items())))
        if key != self.key:
            self.release()
            self.app, self.ctx = build_client(config_yaml, node_config)
            self.key = key
        return self.app

    def release(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx.model.unload()  # the base is cached per process: take the old adapter off it
        self.key = self.app = self.ctx = None


_NODE = NodeClient()


def client_for(config_yaml: str, node_config: dict[str, Any], run_id: int):
    """The node's client app for this run (see `NodeClient`)."""
    return _NODE.get(config_yaml, node_config, run_id)


def agree(config_yaml: str, path: str) -> None:
    """Refuse to train unless the server's experiment is the one this node agreed to (node config ``config=PATH``).

    Without it a node trains under whatever config the server sends (model, LoRA, steps, prompt format;
    with ``data-path`` never which data).
    """
    theirs, mine = _flat(cfg.from_dict(yaml.safe_load(config_yaml)).to_dict()), _flat(cfg.load(path).to_dict())
    differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"the server's experiment differs from this node's config={path} in {', '.join(differ[:5])}: "
                         "refusing to train; update the node's copy if the change is agreed.")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``"""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def handle(inbound: Message, config_yaml: str | None, context: Context) -> Message:
    """One message on a node: identify it, or run the paradigm's client app (keeping its state in Flower's context)."""
    node_config = dict(context.node_config)
    if inbound.kind == HELLO:
        return Message({}, {"kind": HELLO, "partition_id": partition_id(node_config)})
    if config_yaml is None:
        raise WireError("the server sent no experiment config with its message")
    if node_config.get("config"):
        agree(config_yaml, str(node_config["config"]))
    app = client_for(config_yaml, node_config, context.run_id)
    if inbound.kind == "secagg":  # SecAgg+'s keys and shares live in Flower's node state between its stages
        app.context = context
    # A paradigm whose clients keep state between rounds (KD's private adapters) keeps it in `app.state`.
    paradigm = (yaml.safe_load(config_yaml).get("federation") or {}).get("paradigm", "fedpeft")
    stateful = registry.get(paradigm).stateful_clients
    if stateful and STATE_KEY in context.state:
        app.state = unpack(RecordDict({"fedtune": context.state[STATE_KEY]}))[0].tensors
    reply = app(inbound)
    if stateful:
        context.state[STATE_KEY] = pack(Message(app.state))["fedtune"]
    reply.meta.setdefault("src", partition_id(node_config))
    return reply


client_app = ClientApp()


@client_app.train()
def _client_train(msg: FlowerMessage, context: Context) -> FlowerMessage:
    return _client_reply(msg, context)


@client_app.query()
def _client_query(msg: FlowerMessage, context: Context) -> FlowerMessage:
    return _client_reply(msg, context)


def _client_reply(msg: FlowerMessage, context: Context) -> FlowerMessage:
    try:
        inbound, config_yaml = unpack(msg.content)
        reply = handle(inbound, config_yaml, context)
    except Exception as err:  # reported to the server as this node's failure, with the reason
        reply = error_reply(-1, f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}")
    return FlowerMessage(pack(reply), reply_to=msg)
