"""fedtune: federated fine-tuning of LLMs, with exact accuracy, communication and compute figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .version import __version__


def run(config: Any, out: str | Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run one experiment (a `Config`, a dict of sections, or a YAML path) and return its summary.

    The summary is the same dict the CLI writes to ``summary.json``.
    """
    from .launch import run as _run

    return _run(config, out=out, quiet=quiet)


__all__ = ["run", "__version__"]
