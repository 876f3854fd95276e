"""Server checkpoints: resume a run after its server stopped, with the result of an uninterrupted run.

After every finished round the server's round loop saves what the next round depends on:

* FedLLM (`fedpeft.serve`): the global adapter, the strategy's state (FedAvgM/FedAdam buffers);
* KD-FedLLM (`kd.serve`): the global adapter, the server optimizer's state (its distillation runs
  all run long) and the soft labels it will send next round;
* Split-FedLLM (`split.serve`): the global bottom adapter, the strategy's state, the main server's
  top adapter and its optimizer's state;

and, for all three, the client sampler's RNG state and the evaluations so far. When a run starts in
a folder holding a checkpoint of the same config, the loop continues after the last finished round.
Client RNGs are seeded by (seed, round, client), so the rest of the run is the same as if it had
never stopped.

KD clients keep a private adapter from round to round. That is client state, so it is not in the
server's checkpoint: each simulated client keeps its own in a `ClientStore` (``<run>/kd-clients``),
by round, so that a round the server redoes after a restart starts from the adapter the client had
before it. A client without a run folder (a Flower node, whose adapter lives in Flower's per-run node
state) starts a resumed run from its initial adapter; see ``README`` for what that changes.

Not checkpointed (`enabled` is false): the centralized baseline, whose one client keeps its optimizer
across rounds, and split learning against a networked main server (``runtime.split_server``), whose
top adapter and optimizer live in the service's process.

The file is one `wire` message (safetensors tensors + a JSON header; no pickle), written to a
temporary file and moved into place with `os.replace`, so a crash mid-write leaves the previous
checkpoint intact. The header holds a SHA-256 of the content (every tensor's name, dtype, shape and
bytes, and the rest of the header), checked on load: flipped bytes, a renamed key or an edited round
number make the file unreadable, never silently wrong. The checkpoint before it is kept beside it
(`PREVIOUS`); an unreadable checkpoint falls back to that one, losing one round instead of all. It also records the length of ``metrics.jsonl`` at that moment: a resumed run
cuts the file back to it, dropping the records of the round that did not finish, so no round is
logged twice. A run folder without a checkpoint starts a fresh ``metrics.jsonl`` (`resumes`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import registry
from .wire import Message, WireError, decode, encode

FILE = "checkpoint.safetensors"
PREVIOUS = "checkpoint.previous.safetensors"
"""The checkpoint before the last one: where an unreadable `FILE` falls back to."""

State = dict[str, torch.Tensor]


@dataclass
class Saved:
    """What a checkpoint holds, split back into its parts."""

    round: int
    tensors: dict[str, State]  # group name ("global", "strategy", ...) -> tensors
    meta: dict[str, Any]  # JSON-able paradigm state (sampler, evaluations, strategy scalars, ...)


def enabled(config) -> bool:
    """Whether this run checkpoints its server: ``runtime.checkpoint``, as its paradigm decides (`Paradigm.checkpoints`)."""
    return registry.get(config.federation.paradigm).checkpoints(config)


def resumes(folder: Path, config) -> bool:
    """Whether a run of `config` in `folder` continues from a checkpoint there."""
    return enabled(config) and any((Path(folder) / name).exists() for name in (FILE, PREVIOUS))


def fingerprint(config) -> str:
    """Identifies the experiment a checkpoint belongs to (a checkpoint never resumes another experiment).

    The ``runtime`` section is left out: the runtimes give the same result, so a run may resume
    on another one (e.g. locally after a crash over Flower, or on fewer GPUs).
    """
    experiment = {k: v for k, v in config.to_dict().items() if k != "runtime"}
    return hashlib.sha256(json.dumps(experiment, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state(rng: random.Random) -> list:
    """A `random.Random` state as JSON-able lists."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[State, dict[str, Any]]:
    """A torch optimizer's per-parameter state as CPU tensors named ``"<param index>.<name>"``, plus JSON meta.

    The meta holds the non-tensor entries and the parameter count of each group. The groups'
    hyperparameters are not saved: they come from the config, which the checkpoint's fingerprint pins.
    """
    sd = opt.state_dict()
    tensors: State = {}
    scalars: dict[str, Any] = {}
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().to("cpu", copy=True)
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"scalars": scalars, "group_sizes": [len(g["params"]) for g in sd["param_groups"]]}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: State, meta: dict[str, Any]) -> None:
    """Put the state `optimizer_state` saved back into `opt` (built the same way, over the same parameters).

    Raises:
        ValueError: `opt` has other parameter groups than the saved one.
    """
    current = opt.state_dict()
    sizes = [len(g["params"]) for g in current["param_groups"]]
    if sizes != meta["group_sizes"]:
        raise ValueError(f"the checkpoint's optimizer has parameter groups of sizes {meta['group_sizes']}, this "
                         f"run's has {sizes}: the checkpoint is of another model or adapter.")
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def digest(msg: Message) -> str:
    """SHA-256 of a message's content: its metadata (less any ``sha256`` key) and every tensor's name,
    dtype, shape and bytes, in name order."""
    h = hashlib.sha256(json.dumps({k: v for k, v in msg.meta.items() if k != "sha256"}, sort_keys=True,
                                  default=str).encode())
    for name in sorted(msg.tensors):
        t = msg.tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_atomic(path: Path, msg: Message, previous: Path | None = None) -> None:
    """Write `msg` (sealed with its `digest`) to `path` through a temporary file, so a crash mid-write leaves
    the old file; with `previous`, the old file is moved there first instead of being replaced."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory where fedtune keeps a checkpoint file: move it out of the run folder.")
    sealed = Message(msg.tensors, {**msg.meta, "sha256": digest(msg)})
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(encode(sealed))
        f.flush()
        os.fsync(f.fileno())
    if previous is not None and path.is_file():
        os.replace(path, previous)
    os.replace(tmp, path)


def _read_sealed(path: Path, keys: tuple[str, ...], what: str, fix: str) -> Message:
    """Read a file `_write_atomic` wrote; ValueError naming the file, the problem and `fix` when it is a
    directory, not a fedtune message, lacks one of `keys`, or fails its checksum."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a {what}: move it out of the run folder ({fix}).")
    try:
        msg = decode(path.read_bytes())
        missing = [k for k in (*keys, "sha256") if k not in msg.meta]
        if missing:
            raise WireError(f"its header lacks {', '.join(map(repr, missing))}")
        if msg.meta["sha256"] != digest(msg):
            raise WireError("its content does not match the SHA-256 in its header: it was edited or corrupted")
    except (WireError, OSError) as err:
        raise ValueError(f"{path} is not a readable {what} ({err}); {fix}.") from None
    return msg


def _split_groups(flat: State) -> dict[str, State]:
    groups: dict[str, State] = {}
    for key, t in flat.items():
        group, _, name = key.partition("/")
        groups.setdefault(group, {})[name] = t
    return groups


class Checkpoint:
    """The checkpoint of one run folder.

    Args:
        folder: The run folder (holds ``metrics.jsonl`` and the checkpoint file).
        config: The run's `Config`; a checkpoint of another experiment is refused.
    """

    def __init__(self, folder: Path, config) -> None:
        self.path = Path(folder) / FILE
        self.metrics = Path(folder) / "metrics.jsonl"
        self.fingerprint = fingerprint(config)
        self.fallback = ""  # set by `load` when it fell back to the previous checkpoint: why

    def save(self, rnd: int, tensors: dict[str, State], meta: dict[str, Any]) -> None:
        """Atomically replace the checkpoint with the state after round `rnd`."""
        flat = {f"{group}/{name}": t for group, state in tensors.items() for name, t in state.items()}
        metrics_bytes = self.metrics.stat().st_size if self.metrics.exists() else 0
        header = {"round": rnd, "config": self.fingerprint, "metrics_bytes": metrics_bytes, "state": meta}
        _write_atomic(self.path, Message(flat, header), previous=self.path.with_name(PREVIOUS))

    def load(self) -> Saved | None:
        """The saved state, or None when the folder holds no checkpoint.

        An unreadable checkpoint falls back to the one before it (`PREVIOUS`), saying so in `fallback`.
        Also truncates ``metrics.jsonl`` to what it held when the checkpoint read was written.

        Raises:
            ValueError: The checkpoint belongs to another config, or neither it nor the previous one can be read.
        """
        self.fallback = ""
        previous = self.path.with_name(PREVIOUS)
        if not self.path.exists() and not previous.exists():
            return None
        fix = f"delete {self.path.name} and {previous.name} to start this folder over"
        try:
            msg = self._read(self.path, fix)
        except ValueError as err:
            if not previous.is_file():
                raise
            msg = self._read(previous, fix)
            self.fallback = f"{err} Resuming from the checkpoint before it, {previous.name}."
        rnd, owner, metrics_bytes, meta = (msg.meta[k] for k in ("round", "config", "metrics_bytes", "state"))
        if owner != self.fingerprint:
            raise ValueError(
                f"{self.path.parent} holds a checkpoint of a different config: resuming would mix two experiments. "
                f"Give this run another folder (--out), or {fix}."
            )
        if self.metrics.exists() and self.metrics.stat().st_size > metrics_bytes:
            os.truncate(self.metrics, metrics_bytes)
        return Saved(int(rnd), _split_groups(msg.tensors), meta)

    def _read(self, path: Path, fix: str) -> Message:
        msg = _read_sealed(path, ("round", "config", "metrics_bytes", "state"), "fedtune checkpoint", fix)
        meta = msg.meta
        if (isinstance(meta["round"], bool) or not isinstance(meta["round"], int) or meta["round"] < 0
                or not isinstance(meta["metrics_bytes"], int) or not isinstance(meta["state"], dict)):
            raise ValueError(f"{path} is not a readable fedtune checkpoint (its header's round, metrics_bytes or "
                             f"state is malformed); {fix}.")
        return msg


class ClientStore:
    """A client's own state by round (a KD client's private adapter), so a redone round starts where it did.

    A server checkpoints after its round; a client finishes its part of the round before that. When the
    server stops in between and resumes, it redoes the round, and the client must start it again from
    the state it had *before* it. So the store keeps two states: the one the client last started from
    and the one it ended with, each tagged with its round (0: the initial state, which is not stored).

    Args:
        path: The file (one `wire` message; tensors named ``"<round>/<key>"``).
        config: The run's `Config`; a store of another experiment is refused.
    """

    def __init__(self, path: Path, config) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint(config)

    def _read(self) -> dict[int, State]:
        if not self.path.exists():
            return {}
        msg = _read_sealed(self.path, ("config",), "fedtune client state", "delete it to start this client over")
        if msg.meta["config"] != self.fingerprint:
            raise ValueError(f"{self.path} holds a client state of a different config; delete it to start this "
                             "client over.")
        return {int(r): state for r, state in _split_groups(msg.tensors).items()}

    def before(self, rnd: int) -> tuple[int, State] | None:
        """The latest stored state of a round before `rnd`, with its round; None: start from the initial state."""
        earlier = {r: state for r, state in self._read().items() if r < rnd}
        if not earlier:
            return None
        latest = max(earlier)
        return latest, earlier[latest]

    def save(self, rnd: int, state: State, start: tuple[int, State] | None) -> None:
        """Record `state` as the client's state after round `rnd`, which it started from `start`."""
        rounds = {rnd: state}
        if start is not None:
            rounds[start[0]] = start[1]
        flat = {f"{r}/{k}": t.detach().to("cpu") for r, st in rounds.items() for k, t in st.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, Message(flat, {"config": self.fingerprint, "rounds": sorted(rounds)}))
