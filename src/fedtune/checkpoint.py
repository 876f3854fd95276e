"""Server checkpoints: resume a run after its server stopped, with the result of an uninterrupted run.

After every finished round the FedLLM round loop (`fedpeft.serve`) saves what the next round depends
on: the global adapter, the strategy's state (FedAvgM/FedAdam buffers), the client sampler's RNG
state and the evaluations so far. When a run starts in a folder holding a checkpoint of the same
config, the loop continues after the last finished round; client RNGs are seeded by (seed, round,
client), so the rest of the run is the same as if it had never stopped.

Only `fedpeft` and `fedprox` checkpoint (`enabled`): the centralized baseline keeps its client's
optimizer across rounds, KD clients keep private adapters, and split learning's main server keeps
its optimizer, none of which a server checkpoint holds.

The file is one `wire` message (safetensors tensors + a JSON header; no pickle), written to a
temporary file and moved into place with `os.replace`, so a crash mid-write leaves the previous
checkpoint intact. It also records the length of ``metrics.jsonl`` at that moment: a resumed run
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

from .wire import Message, WireError, decode, encode

FILE = "checkpoint.safetensors"

State = dict[str, torch.Tensor]


@dataclass
class Saved:
    """What a checkpoint holds, split back into its parts."""

    round: int
    tensors: dict[str, State]  # group name ("global", "strategy", ...) -> tensors
    meta: dict[str, Any]  # JSON-able paradigm state (sampler, evaluations, strategy scalars, ...)


def enabled(config) -> bool:
    """Whether this run checkpoints its server (``runtime.checkpoint`` and a paradigm whose state it holds)."""
    return config.runtime.checkpoint and config.federation.paradigm in ("fedpeft", "fedprox")


def resumes(folder: Path, config) -> bool:
    """Whether a run of `config` in `folder` continues from a checkpoint there."""
    return enabled(config) and (Path(folder) / FILE).exists()


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

    def save(self, rnd: int, tensors: dict[str, State], meta: dict[str, Any]) -> None:
        """Atomically replace the checkpoint with the state after round `rnd`."""
        flat = {f"{group}/{name}": t for group, state in tensors.items() for name, t in state.items()}
        metrics_bytes = self.metrics.stat().st_size if self.metrics.exists() else 0
        header = {"round": rnd, "config": self.fingerprint, "metrics_bytes": metrics_bytes, "state": meta}
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(encode(Message(flat, header)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def load(self) -> Saved | None:
        """The saved state, or None when the folder holds no checkpoint.

        Also truncates ``metrics.jsonl`` to what it held when the checkpoint was written.

        Raises:
            ValueError: The checkpoint belongs to another config, or cannot be read.
        """
        if not self.path.exists():
            return None
        try:
            msg = decode(self.path.read_bytes())
            rnd, owner, metrics_bytes, meta = (msg.meta[k] for k in ("round", "config", "metrics_bytes", "state"))
        except (WireError, KeyError) as err:
            raise ValueError(f"{self.path} is not a readable fedtune checkpoint ({err}); delete it to start over.") \
                from None
        if owner != self.fingerprint:
            raise ValueError(
                f"{self.path.parent} holds a checkpoint of a different config: resuming would mix two experiments. "
                f"Give this run another folder (--out), or delete {self.path} to start this folder over."
            )
        if self.metrics.exists() and self.metrics.stat().st_size > metrics_bytes:
            os.truncate(self.metrics, metrics_bytes)
        tensors: dict[str, State] = {}
        for key, t in msg.tensors.items():
            group, _, name = key.partition("/")
            tensors.setdefault(group, {})[name] = t
        return Saved(int(rnd), tensors, meta)
