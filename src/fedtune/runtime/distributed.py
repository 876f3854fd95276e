"""Multi-process simulation: the clients of each round spread over several processes (one per GPU).

A simulation that outgrows one GPU runs as ``runtime.world_size`` processes of one host joined by
torch.distributed (NCCL on GPUs, gloo on CPUs). Every rank loads the same base model, data and client apps
(`experiment.setup` with the same config and seed). Rank 0 runs `experiment.run` with a `DistributedGrid`:
the paradigm's own server loop, evaluation and the run folder. The other ranks run `serve_worker`: each round
they take their share of the messages, run those clients one after another, and send the replies back.

Messages cross ranks as their wire encoding (`wire.encode` bytes in uint8 tensors, sizes first, then the
payloads, through broadcast / scatter / all_gather / gather), never through the pickle-based ``*_object``
collectives; the messages of a round that carry one global state travel to each rank as one `bundle`.
Rank 0 decodes every reply exactly as the local runtime does, and a client that raises on any rank comes
back as `grid.error_reply`. Aggregation stays the paradigm's, so each reply is still screened
and one bad client can be dropped (a reduce-only aggregate over ranks could not reject it).

Who runs which client: each round, whatever subset the server sampled, its clients are dealt out to balance
the ranks' work (`balance`: longest first, by each client's time measured in its last round; round robin
while nothing is known), except for paradigms whose clients keep state between rounds (KD's private
adapters, the centralized baseline's optimizer), where client k always lives on rank ``k % world_size``.

Two ways to start it (`launch`): ``fedtune run CONFIG --set runtime.world_size=N`` spawns the N processes
itself (a free port on 127.0.0.1), and ``torchrun --nproc-per-node N -m fedtune.cli run CONFIG`` starts them
from outside (``env://``, detected by `under_torchrun`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import config as cfg
from .. import experiment
from .. import registry
from ..context import RunContext
from ..grid import ClientApp, SequentialStream, error_reply
from . import free_port
from ..models import resolve_device
from ..progress import Bars
from ..wire import DEFAULT_MAX_BYTES, Message, WireError, decode, encode
from .local import LocalGrid

_STOP, _ROUND = 0, 1

TIMEOUT = timedelta(hours=2)
"""How long a rank waits in a collective (workers wait through rank 0's evaluations and checkpoints)."""


# --------------------------------------------------------------------------- bytes between ranks


def pack(payloads: list[bytes]) -> bytes:
    """Several payloads in one buffer: their count and lengths as little-endian u64, then the bytes."""
    return struct.pack(f"<{1 + len(payloads)}Q", len(payloads), *map(len, payloads)) + b"".join(payloads)


def unpack(buffer: bytes) -> list[bytes]:
    """The payloads `pack` put in `buffer`."""
    (n,) = struct.unpack_from("<Q", buffer)
    sizes = struct.unpack_from(f"<{n}Q", buffer, 8)
    start = 8 * (1 + n)
    assert start + sum(sizes) == len(buffer), "a packed buffer lost bytes between ranks"
    out = []
    for size in sizes:
        out.append(buffer[start:start + size])
        start += size
    return out


class Channel:
    """Byte buffers between rank 0 and the other ranks, carried by collectives of uint8 tensors.

    A round is one `scatter` (rank 0 deals each rank its buffer) then one `gather` (rank 0 collects one
    buffer from each rank); `stop` tells the other ranks there are no more rounds. Sizes travel first,
    so every rank can allocate (and pad to) the largest buffer, as the collectives need equal shapes.
    """

    def __init__(self, device: torch.device) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = device
        self.in_round = False

    def _tensor(self, data: bytes, width: int) -> torch.Tensor:
        """`data` zero-padded to `width` bytes, as a uint8 tensor on the channel's device."""
        padded = bytearray(width)
        padded[: len(data)] = data
        return torch.frombuffer(padded, dtype=torch.uint8).to(self.device)

    def _bytes(self, t: torch.Tensor, size: int) -> bytes:
        return t[:size].cpu().numpy().tobytes()

    def scatter(self, chunks: list[bytes] | None = None, command: int = _ROUND) -> tuple[int, bytes]:
        """Rank 0 sends ``chunks[r]`` to rank r; every rank returns ``(command, its chunk)``.

        The other ranks pass nothing and learn the command (a round, or `_STOP`) from rank 0.
        """
        head = torch.zeros(1 + self.world, dtype=torch.int64)
        if self.rank == 0:
            sizes = [len(c) for c in chunks] if chunks is not None else [0] * self.world
            head = torch.tensor([command, *sizes], dtype=torch.int64)
        head = head.to(self.device)
        dist.broadcast(head, src=0)
        command, *sizes = head.tolist()
        if command == _STOP:
            return command, b""
        width = max(sizes)
        mine = torch.empty(width, dtype=torch.uint8, device=self.device)
        dist.scatter(mine, [self._tensor(c, width) for c in chunks] if self.rank == 0 else None, src=0)
        self.in_round = True
        return command, self._bytes(mine, sizes[self.rank])

    def gather(self, chunk: bytes) -> list[bytes]:
        """Every rank sends `chunk`; rank 0 returns all of them in rank order, the others ``[]``."""
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(chunk)], dtype=torch.int64, device=self.device))
        sizes = [int(s) for s in sizes]
        width = max(sizes)
        bufs = [torch.empty(width, dtype=torch.uint8, device=self.device) for _ in range(self.world)] \
            if self.rank == 0 else None
        dist.gather(self._tensor(chunk, width), bufs, dst=0)
        self.in_round = False
        return [self._bytes(b, n) for b, n in zip(bufs, sizes)] if self.rank == 0 else []

    def stop(self) -> None:
        """Rank 0: release the other ranks from `serve_worker`.

        Skipped when rank 0 fails in the middle of a round: the others wait in another collective, and the
        launcher (spawn or torchrun) tears the whole group down when a rank dies.
        """
        if not self.in_round:
            self.scatter(None, command=_STOP)


# --------------------------------------------------------------------------- clients on every rank


BUNDLE = "bundle"
"""Meta key of a bundled message: the list of the metadata of the messages it stands for."""


def bundle(indexed: list[tuple[int, Message]]) -> list[tuple[list[int], Message]]:
    """Messages that share one tensors dict (a round's global state) as one message: the tensors once.

    Returns ``(indices of the bundled messages, bundle)`` pairs; the bundle is an ordinary wire message
    whose metadata lists theirs, so a rank receives the global state once, not once per client.
    """
    groups: dict[int, list[tuple[int, Message]]] = {}
    for i, m in indexed:
        groups.setdefault(id(m.tensors), []).append((i, m))
    return [([i for i, _ in g], Message(g[0][1].tensors, {BUNDLE: [m.meta for _, m in g]})) for g in groups.values()]


def unbundle(msg: Message) -> list[Message]:
    """The messages a bundle stands for, each with its own copy of the tensors (no client sees another's)."""
    return [Message({k: v.clone() for k, v in msg.tensors.items()}, meta) for meta in msg.meta[BUNDLE]]


def run_share(apps: dict[int, ClientApp], buffer: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Decode this rank's share of a round, run its clients one after another, return the encoded replies.

    A client that raises, is unknown here, or whose reply cannot be encoded becomes an error reply:
    one failing client never takes its rank, or the round, down.
    """
    inbound = [m for p in unpack(buffer) for m in unbundle(decode(p, max_bytes=max_bytes))]
    replies = LocalGrid(apps, serialize=False).send_and_receive(inbound)
    out = []
    for msg, reply in zip(inbound, replies):
        try:
            out.append(encode(reply))
        except WireError as err:
            out.append(encode(error_reply(int(msg.meta["dst"]), f"reply could not be encoded: {err}")))
    return pack(out)


def serve_worker(apps: dict[int, ClientApp], channel: Channel, max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """A rank other than 0: serve its share of every round until rank 0 says stop; returns the rounds served."""
    rounds = 0
    while True:
        command, buffer = channel.scatter()
        if command == _STOP:
            return rounds
        channel.gather(run_share(apps, buffer, max_bytes))
        rounds += 1


def balance(costs: list[float], world: int) -> list[int]:
    """Ranks for jobs of the given costs: longest first, each to the least loaded rank (ties: the lowest rank).

    Equal costs (the first round, or clients that all take the same number of steps) give round robin:
    job i on rank ``i % world``. Which rank runs a client does not change its result, only the round's time.
    """
    load = [0.0] * world
    ranks = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):  # stable: equal costs keep their order
        rank = min(range(world), key=lambda r: load[r])
        ranks[i] = rank
        load[rank] += costs[i]
    return ranks


class DistributedGrid(SequentialStream):
    """The `Grid` rank 0's server talks through: each call is one round spread over all ranks.

    ``parallel`` is true, so the round loops send the whole round's messages in one call (`grid.exchange`).
    Rank 0 runs its own share of the clients between dealing the messages and collecting the replies.
    """

    parallel = True

    def __init__(self, apps: dict[int, ClientApp], channel: Channel, *, sticky: bool = False,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        assert channel.rank == 0, "only rank 0 runs the server"
        self.apps = dict(apps)
        self.channel = channel
        self.sticky = sticky
        self.max_bytes = max_bytes
        self.seconds: dict[int, float] = {}  # each client's last measured round time, for `balance`

    def node_ids(self) -> list[int]:
        return sorted(self.apps)

    def ranks_for(self, messages: list[Message]) -> list[int]:
        """The rank that runs each message's client (see the module docstring)."""
        world = self.channel.world
        if self.sticky:
            return [int(m.meta["dst"]) % world for m in messages]
        known = list(self.seconds.values())
        guess = sum(known) / len(known) if known else 1.0
        return balance([self.seconds.get(int(m.meta["dst"]), guess) for m in messages], world)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        ranks = self.ranks_for(messages)
        shares = [bundle([(i, m) for i, (m, r) in enumerate(zip(messages, ranks)) if r == k])
                  for k in range(self.channel.world)]
        _, mine = self.channel.scatter([pack([encode(b) for _, b in share]) for share in shares])
        gathered = self.channel.gather(run_share(self.apps, mine, self.max_bytes))
        replies: list[Message | None] = [None] * len(messages)
        for rank, (share, buffer) in enumerate(zip(shares, gathered)):
            order = [i for indices, _ in share for i in indices]
            for i, payload in zip(order, unpack(buffer), strict=True):
                dst = int(messages[i].meta["dst"])
                try:
                    reply = decode(payload, max_bytes=self.max_bytes)
                except WireError as err:
                    reply = error_reply(dst, f"rejected reply from rank {rank}: {err}")
                reply.meta.setdefault("src", dst)
                if isinstance(reply.meta.get("seconds"), (int, float)) and reply.meta["seconds"] > 0:
                    self.seconds[dst] = float(reply.meta["seconds"])
                replies[i] = reply
        return replies


# --------------------------------------------------------------------------- one rank's run


def check(c: cfg.Config, world: int) -> str:
    """Refuse configs a multi-process run cannot honour, naming the field and the fix; return the backend."""
    f = c.federation
    spec = registry.get(f.paradigm)
    refusal = spec.refusal(c, "distributed")
    if refusal:
        raise cfg.ConfigError(refusal)
    if not spec.single_client and world > f.clients_per_round:
        raise cfg.ConfigError(
            f"runtime.world_size = {world} is more than federation.clients_per_round = {f.clients_per_round}: "
            "some processes would have no client to simulate in any round. Lower runtime.world_size or raise "
            "federation.clients_per_round."
        )
    device = resolve_device(c.model.device)
    backend = c.runtime.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise cfg.ConfigError(
            f"runtime.backend = 'nccl' needs the model on CUDA GPUs, but model.device = {c.model.device!r} "
            f"resolves to {device.type} here. Use runtime.backend=gloo (or auto), or run on a GPU machine."
        )
    if backend == "nccl" and not dist.is_nccl_available():
        raise cfg.ConfigError("runtime.backend = 'nccl' but this torch build has no NCCL: use runtime.backend=gloo.")
    if device.type == "cuda":
        if device.index is not None:
            raise cfg.ConfigError(
                f"model.device = {c.model.device!r} would put every process on one GPU: use model.device=auto "
                "(or cuda); with runtime.world_size > 1, rank r uses cuda:r."
            )
        if world > torch.cuda.device_count():
            raise cfg.ConfigError(
                f"runtime.world_size = {world} but this machine has {torch.cuda.device_count()} GPU(s): one process "
                "per GPU. Lower runtime.world_size, or use model.device=cpu with runtime.backend=gloo."
            )
    return backend


def init_rank(c: cfg.Config, rank: int, local_rank: int, world: int, backend: str, init_method: str) -> Channel:
    """Join the process group and pick this rank's device; returns the rank's `Channel`.

    On GPUs rank r uses cuda:r (``model.device=auto`` then resolves to it); on the CPU each rank gets an
    equal share of the cores unless ``OMP_NUM_THREADS`` says otherwise.
    """
    if resolve_device(c.model.device).type == "cuda":
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT)
    return Channel(torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu"))


def _server_only() -> float:
    raise AssertionError("only rank 0 evaluates the global model")


def run_rank(c: cfg.Config, channel: Channel, out: str | Path | None, quiet: bool) -> dict[str, Any]:
    """This rank's part of the run: rank 0 the whole experiment over a `DistributedGrid`, the others `serve_worker`.

    Returns the summary on rank 0, ``{}`` elsewhere.
    """
    if channel.rank == 0:
        # Clients that keep state between rounds (KD's private adapters, the centralized optimizer) stay on one rank.
        sticky = registry.get(c.federation.paradigm).stateful_clients

        def grid(ctx: RunContext, paradigm) -> DistributedGrid:
            return DistributedGrid(registry.wrap_clients(c, paradigm.make_clients(ctx)), channel, sticky=sticky)

        try:
            return experiment.run(c, out, quiet, grid_factory=grid)
        finally:
            channel.stop()
    bars = Bars(quiet=True)
    model, tokenizer, data, device = experiment.setup(c, bars)
    try:
        ctx = experiment.context(c, model, tokenizer, data, device, bars, log=lambda record: None, score=_server_only,
                                 path=Path(out or "."))
        try:
            serve_worker(registry.wrap_clients(c, registry.get(c.federation.paradigm).make_clients(ctx)), channel)
        finally:
            ctx.close()
    finally:
        model.unload()
    return {}


# --------------------------------------------------------------------------- launch


def under_torchrun() -> bool:
    """Whether torchrun (or another env:// launcher) started this process as one of several ranks."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) and int(os.environ["WORLD_SIZE"]) > 1


def launch(c: cfg.Config, out: str | Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run `c` on several processes: under torchrun as this rank, otherwise spawn ``runtime.world_size`` of them.

    Returns the summary (written by rank 0 to ``<out>/summary.json``); ranks other than 0 under torchrun get ``{}``.
    """
    if under_torchrun():
        return _as_torchrun_rank(c, out, quiet)
    world = c.runtime.world_size
    backend = check(c, world)
    path = Path(out) if out else experiment.default_out(c.name)
    errors = Path(tempfile.mkdtemp(prefix="fedtune-ranks-"))
    try:
        mp.spawn(_spawned, args=(cfg.to_yaml(c), str(path), quiet, free_port(), backend, str(errors)),
                 nprocs=world, join=True)
    except mp.ProcessRaisedException as err:
        # A mistake in the user's input (a missing file, a bad field) reads as it does in one process.
        reported = sorted(errors.glob("rank*.txt"))
        if reported:
            raise ValueError(reported[0].read_text()) from None
        raise RuntimeError(f"a process of the {world}-process run failed:\n{err}") from None
    finally:
        shutil.rmtree(errors, ignore_errors=True)
    return json.loads((path / "summary.json").read_text())


def _spawned(rank: int, config_yaml: str, out: str, quiet: bool, port: int, backend: str, errors: str) -> None:
    """Entry point of each spawned process (the config travels as YAML text and is validated again)."""
    import yaml

    c = cfg.from_dict(yaml.safe_load(config_yaml))
    world = c.runtime.world_size
    channel = init_rank(c, rank, rank, world, backend, f"tcp://127.0.0.1:{port}")
    try:
        run_rank(c, channel, out, quiet)
    except (ValueError, FileNotFoundError) as err:
        (Path(errors) / f"rank{rank}.txt").write_text(str(err))
        raise
    finally:
        dist.destroy_process_group()


def _as_torchrun_rank(c: cfg.Config, out: str | Path | None, quiet: bool) -> dict[str, Any]:
    world, rank, local = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if c.runtime.world_size not in (1, world):
        raise cfg.ConfigError(
            f"runtime.world_size = {c.runtime.world_size} but torchrun started {world} processes: leave "
            f"runtime.world_size unset (torchrun decides) or set it to {world}."
        )
    c = dataclasses.replace(c, runtime=dataclasses.replace(c.runtime, world_size=world))
    backend = check(c, world)
    channel = init_rank(c, rank, local, world, backend, "env://")
    try:
        return run_rank(c, channel, out, quiet)
    finally:
        dist.destroy_process_group()
