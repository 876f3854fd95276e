"""FLOPs of repeated blocks of work, counted once per block shape and reused (`FlopCache`)."""

from __future__ import annotations

from typing import Any

from torch.utils.flop_counter import FlopCounterMode

from .meter import sdpa_formulas


class FlopCache:
    """FLOPs of repeated blocks of work, counted once per key and reused after that.

    FlopCounterMode intercepts every op in Python, which costs more than a small model's step on a GPU.
    A block's FLOPs depend only on the shapes its ops see, so the caller names each block by a key that
    fixes those shapes (batch, sequence and, where the LM head runs only on target positions, their
    count): the first block with a key is counted, later ones add that count without intercepting.
    ``every=True`` counts every block instead (the reference the tests compare with). Disabled, it
    counts nothing and `total` stays None.
    """

    def __init__(self, enabled: bool = True, *, every: bool = False) -> None:
        self.enabled, self.every = enabled, every
        self.per_key: dict[Any, int] = {}
        self._total = 0

    @property
    def total(self) -> int | None:
        """FLOPs of the blocks since the last `take` (None when disabled)."""
        return self._total if self.enabled else None

    def take(self) -> int | None:
        """`total`, then start again from 0."""
        out, self._total = self.total, 0
        return out

    def block(self, key: Any) -> "_CountedBlock":
        """``with cache.block(key):`` around one block of work."""
        return _CountedBlock(self, key)


class _CountedBlock:
    def __init__(self, cache: FlopCache, key: Any) -> None:
        self.cache, self.key = cache, key
        self.counter: FlopCounterMode | None = None

    def __enter__(self) -> None:
        c = self.cache
        if c.enabled and (c.every or self.key not in c.per_key):
            self.counter = FlopCounterMode(display=False, custom_mapping=sdpa_formulas())
            self.counter.__enter__()

    def __exit__(self, exc_type, exc, tb) -> None:
        c = self.cache
        if self.counter is not None:
            self.counter.__exit__(exc_type, exc, tb)
            if exc_type is None:
                c.per_key[self.key] = int(sum(self.counter.get_flop_counts().get("Global", {}).values()))
        if c.enabled and exc_type is None:
            c._total += c.per_key[self.key]
