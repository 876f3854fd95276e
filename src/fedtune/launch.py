"""Run an experiment in one process or several: what `fedtune run` and `fedtune compare` call.

One process is `experiment.run`. With ``runtime.world_size > 1``, or when torchrun started this
process as one of several ranks, the multi-process runtime (`fedtune.runtime.distributed`) starts
the ranks; its rank 0 runs `experiment.run` over a grid that spans them, the others return ``{}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import config as cfg
from . import experiment
from .runtime import distributed


def run(config: cfg.Config | dict | str | Path, out: str | Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run one experiment (see `experiment.run`) on as many processes as its config asks for."""
    c = experiment.load(config)
    if c.runtime.world_size > 1 or distributed.under_torchrun():
        return distributed.launch(c, out, quiet)
    return experiment.run(c, out, quiet)
