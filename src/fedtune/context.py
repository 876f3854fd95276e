"""What every paradigm gets from the experiment around it (`RunContext`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .progress import Bars


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

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def client_examples(self, node: int) -> list:
        return [self.data.train[j] for j in self.data.parts[node]]

    def save_adapter(self) -> None:
        """Write the model's current adapter to ``<run>/adapter`` in PEFT format."""
        self.model.save_pretrained(self.path / "adapter")
