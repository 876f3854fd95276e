"""What every paradigm gets from the experiment around it (`RunContext`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .progress import Bars

if TYPE_CHECKING:
    from .config import Config


@dataclass
class RunContext:
    """The prepared pieces of one run, handed to a paradigm's ``make_clients`` and ``run_server``.

    Attributes:
        config: The validated config.
        model: The shared frozen base wrapped with a LoRA adapter (``peft.PeftModel``).
        tokenizer: Its tokenizer.
        data: ``experiment.Prepared``: the task, tokenized train/test examples and client partitions.
        device: Where the model lives.
        bars: Progress bars.
        log: Appends one record to ``metrics.jsonl``.
        score: Scores ``model`` as it is now on the held-out examples (accuracy, exact match or ROUGE-L).
        path: The run folder.
        services: What the runtime provides beyond the Grid (split learning's main server), built by the
            experiment or runtime layer (`fedtune.experiment.services_for`); paradigms only call it.
    """

    config: Config
    model: Any
    tokenizer: Any
    data: Any
    device: torch.device
    bars: Bars
    log: Callable[[dict[str, Any]], None]
    score: Callable[[], float]
    path: Path
    services: Any = None
    _owned: dict[str, tuple[Any, Callable[[Any], None]]] = field(default_factory=dict, repr=False)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def client_examples(self, node: int) -> list:
        return [self.data.train[j] for j in self.data.parts[node]]

    def save_adapter(self) -> None:
        """Write the model's current adapter to ``<run>/adapter`` in PEFT format."""
        self.model.save_pretrained(self.path / "adapter")

    def owned(self, key: str, make: Callable[[], Any], release: Callable[[Any], None]) -> Any:
        """A resource of this run (e.g. KD's separate client model), made once and released by `close`."""
        if key not in self._owned:
            self._owned[key] = (make(), release)
        return self._owned[key][0]

    def close(self) -> None:
        """Release what `owned` made for this run, newest first (whoever built the context calls this)."""
        while self._owned:
            _, (value, release) = self._owned.popitem()
            release(value)
