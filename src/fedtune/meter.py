"""Measured client compute: FLOPs, peak memory and wall time of one block of work.

``ComputeMeter`` wraps the real work a client does in a round (local training,
computing logits, a split-model forward/backward) and reports what that work
actually cost on this machine, rather than an analytic estimate:

* FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over the
  aten ops that really ran. Its stock table misses or mis-handles the fused
  scaled-dot-product-attention kernels used by grouped-query-attention models
  (see ``sdpa_formulas``), so we pass GQA-aware formulas for those ops.
* Peak memory is the CUDA caching allocator's high-water mark on CUDA, and the
  process's peak resident set size on CPU (reset per block where Linux allows).
* Seconds are wall-clock, with CUDA synchronised at both ends; or, with
  ``sync=False`` on CUDA, the GPU time between two CUDA events recorded at the
  ends of the block, so the block never waits for the device (a simulation can
  queue the next client's work before this one's has run).
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["MEMORY_METHODS", "ComputeMeter"]

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"

MEMORY_METHODS: dict[str, str] = {
    "cuda": (
        "peak bytes allocated to tensors by PyTorch's CUDA caching allocator on the device during the "
        "block (torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats); excludes the "
        "CUDA context and allocator cache slack"
    ),
    "vmhwm": (
        "peak resident set size of the whole process during the block (VmHWM from /proc/self/status, "
        "reset at block start by writing 5 to /proc/self/clear_refs, after glibc's malloc_trim returns freed "
        "heap to the OS); includes everything the process holds, e.g. model weights loaded before the block"
    ),
    "ru_maxrss": (
        "peak resident set size of the whole process since it started (getrusage ru_maxrss); it cannot "
        "be reset, so a block reports the largest peak of any earlier work if that was higher"
    ),
    "unavailable": "no peak-memory source on this platform; peak_memory_bytes is 0",
}


# --------------------------------------------------------------------------- #
# FLOP formulas for fused attention
# --------------------------------------------------------------------------- #


def _attention_dims(query: Any, key: Any, value: Any) -> tuple[int, int, int, int, int]:
    """(batch*query_heads, s_q, s_k, d_qk, d_v) from [..., heads, seq, dim] shapes.

    Counting per *query* head is what makes this GQA-aware: the kernel
    broadcasts each key/value head to its group of query heads, so every query
    head does a full QK^T and PV product.
    """
    batch_heads = math.prod(int(d) for d in query[:-2])
    s_q, d_qk = int(query[-2]), int(query[-1])
    s_k, d_v = int(key[-2]), int(value[-1])
    assert int(key[-1]) == d_qk and int(value[-2]) == s_k, (query, key, value)
    return batch_heads, s_q, s_k, d_qk, d_v


def _sdpa_forward_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Standard attention forward: scores = Q K^T, out = scores V (2 FLOPs per MAC).

    Like torch's own formula this ignores causal masking and the softmax.
    """
    bh, s_q, s_k, d_qk, d_v = _attention_dims(query, key, value)
    return 2 * bh * s_q * s_k * d_qk + 2 * bh * s_q * s_k * d_v


def _sdpa_backward_flops(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """Standard fused attention backward (torch's formula, per query head).

    Five matmuls: recompute scores (Q K^T), dP = dO V^T, dV = P^T dO,
    dQ = dS K and dK = dS^T Q.
    """
    bh, s_q, s_k, d_qk, d_v = _attention_dims(query, key, value)
    return 2 * bh * s_q * s_k * (3 * d_qk + 2 * d_v)


def sdpa_formulas() -> dict[Any, Callable[..., int]]:
    """``custom_mapping`` for FlopCounterMode covering the fused SDPA aten ops.

    Why: the CPU fused kernel (``_scaled_dot_product_flash_attention_for_cpu``
    and its backward, which transformers hits with ``enable_gqa=True``) has no
    entry in torch's table, so attention FLOPs were silently dropped; older
    torch releases also asserted equal query/key heads in the CUDA formulas.
    We register one GQA-aware formula for every variant so results do not
    depend on the torch version or the kernel picked. Ops missing from this
    torch build are skipped.
    """
    forward = [
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    ]
    backward = [name + "_backward" for name in forward]
    mapping: dict[Any, Callable[..., int]] = {}
    for names, formula in ((forward, _sdpa_forward_flops), (backward, _sdpa_backward_flops)):
        for name in names:
            try:
                op = getattr(torch.ops.aten, name)
            except (AttributeError, RuntimeError):
                continue
            mapping[op] = formula
    return mapping


# --------------------------------------------------------------------------- #
# Process memory (CPU)
# --------------------------------------------------------------------------- #


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so a block's peak RSS starts from the live footprint.

    Without this, memory freed by earlier work (an evaluation pass, another client)
    stays resident in malloc's free lists and inflates every later block's peak.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _reset_hwm() -> bool:
    """Reset the process's peak RSS to its current RSS; False where not allowed."""
    _trim_heap()
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _ru_maxrss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # the resource module does not exist on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


_CPU_METHOD: str | None = None


def _cpu_memory_method() -> str:
    """Pick (once per process) how CPU peak memory is measured."""
    global _CPU_METHOD
    if _CPU_METHOD is None:
        # Probing resets the high-water mark; harmless because it runs when the
        # first CPU meter is built, so no CPU block is being measured yet.
        if _reset_hwm():
            _CPU_METHOD = "vmhwm"
        elif _ru_maxrss_bytes() is not None:
            _CPU_METHOD = "ru_maxrss"
        else:
            _CPU_METHOD = "unavailable"
    return _CPU_METHOD


def _current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


# --------------------------------------------------------------------------- #
# The meter
# --------------------------------------------------------------------------- #

# Meters currently inside their block, outermost first. A nested meter resets
# the shared high-water mark, so it first hands the peak seen so far to the
# meters around it (see ComputeMeter.__enter__).
_ACTIVE: list[ComputeMeter] = []


class ComputeMeter:
    """Measure FLOPs, peak memory and wall time of one block of real work.

    Use once per block; the same instance may be reused sequentially::

        meter = ComputeMeter(device)
        with meter:
            train_one_round(...)
        report(meter.flops, meter.peak_memory_bytes, meter.seconds)

    Meters may be nested (an outer meter still sees the inner block's peak).
    Not thread-safe: peak memory is a per-process (CPU) or per-device (CUDA)
    figure, so concurrent blocks on one device would see each other.

    Args:
        device: Device the work runs on; picks the memory source. "cpu" or a
            CUDA device.
        count_flops: Count FLOPs with FlopCounterMode. It intercepts every op,
            so turn it off where only memory and time are wanted.
        sync: On CUDA, synchronise at both ends and time the wall clock (True), or
            record CUDA events and time the device's work between them (False):
            nothing waits, and ``seconds`` waits for the end event when first read.
            The peak is the allocator's high-water mark either way (allocations
            are booked when work is queued, not when it runs).
    """

    def __init__(self, device: torch.device | str = "cpu", count_flops: bool = True, sync: bool = True) -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"ComputeMeter measures 'cpu' or 'cuda' devices, got {str(self.device)!r}; "
                "pass the device the work actually runs on"
            )
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"ComputeMeter got device {str(self.device)!r} but CUDA is not available")
        self.count_flops = count_flops
        self._method = "cuda" if self.device.type == "cuda" else _cpu_memory_method()
        self._active = False
        self._counter: FlopCounterMode | None = None
        self._resource: tuple[str, int] = ("cpu", -1)
        self._peak_seen = 0
        self._start = 0.0
        self._flops: int | None = None
        self._flops_by_op: dict[str, int] = {}
        self._peak: int | None = None
        self._start_memory = 0
        self._seconds: float | None = None
        self.sync = sync or self.device.type != "cuda"
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._done = False

    # ----------------------------------------------------------------- API

    @property
    def flops(self) -> int | None:
        """FLOPs of the block, or None when constructed with count_flops=False."""
        self._require_done("flops")
        return self._flops

    @property
    def flops_by_op(self) -> dict[str, int]:
        """FLOPs per aten op (e.g. "aten.mm"); empty when FLOPs were not counted."""
        self._require_done("flops_by_op")
        return dict(self._flops_by_op)

    @property
    def peak_memory_bytes(self) -> int:
        """Peak memory during the block, in bytes; see ``memory_method``."""
        self._require_done("peak_memory_bytes")
        assert self._peak is not None
        return self._peak

    @property
    def start_memory_bytes(self) -> int:
        """Memory in use when the block began (same source as the peak), in bytes."""
        self._require_done("start_memory_bytes")
        return self._start_memory

    @property
    def seconds(self) -> float:
        """Seconds of the block: wall clock, or the device's time between the events with ``sync=False``."""
        self._require_done("seconds")
        if self._seconds is None:
            assert self._events is not None
            start, end = self._events
            end.synchronize()
            self._seconds = start.elapsed_time(end) / 1000.0
        return self._seconds

    @property
    def memory_method(self) -> str:
        """How ``peak_memory_bytes`` was measured, in words."""
        return MEMORY_METHODS[self._method]

    # ----------------------------------------------------- context manager

    def __enter__(self) -> ComputeMeter:
        if self._active:
            raise RuntimeError("this ComputeMeter is already measuring a block; use a separate meter to nest")
        self._flops = self._peak = self._seconds = self._events = None
        self._done = False
        self._flops_by_op = {}
        self._peak_seen = 0
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._resource = ("cuda", index)
            if self.sync:
                # Work queued before the block must not be billed to it.
                torch.cuda.synchronize(index)
            else:
                self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                self._events[0].record()
        else:
            self._resource = ("cpu", -1)
        self._fold_current_peak_into_outer_meters()
        self._start_memory = self._reset_peak()
        _ACTIVE.append(self)
        self._active = True
        if self.count_flops:
            self._counter = FlopCounterMode(display=False, custom_mapping=sdpa_formulas())
            self._counter.__enter__()
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._events is not None:
                self._events[1].record()
            else:
                if self._resource[0] == "cuda":
                    torch.cuda.synchronize(self._resource[1])
                self._seconds = time.perf_counter() - self._start
            if self._counter is not None:
                self._counter.__exit__(exc_type, exc, tb)
                counts = self._counter.get_flop_counts().get("Global", {})
                self._flops_by_op = {str(op): int(n) for op, n in counts.items()}
                self._flops = sum(self._flops_by_op.values())
            self._peak = max(self._read_peak(), self._peak_seen, self._start_memory)
        finally:
            self._counter = None
            self._active = False
            self._done = True
            assert _ACTIVE and _ACTIVE[-1] is self, "ComputeMeter blocks exited out of order"
            _ACTIVE.pop()
        for outer in _ACTIVE:
            if outer._resource == self._resource:
                outer._peak_seen = max(outer._peak_seen, self._peak)

    # ------------------------------------------------------------ internals

    def _require_done(self, name: str) -> None:
        if not self._done or self._active:
            raise RuntimeError(f"ComputeMeter.{name} is available after the `with meter:` block has finished")

    def _fold_current_peak_into_outer_meters(self) -> None:
        outers = [m for m in _ACTIVE if m._resource == self._resource]
        if outers:
            peak = self._read_peak()
            for outer in outers:
                outer._peak_seen = max(outer._peak_seen, peak)

    def _reset_peak(self) -> int:
        """Start a new high-water mark; return memory in use now."""
        method = self._method
        if method == "cuda":
            index = self._resource[1]
            torch.cuda.reset_peak_memory_stats(index)
            return int(torch.cuda.memory_allocated(index))
        if method == "vmhwm":
            _reset_hwm()
        return _current_rss_bytes()

    def _read_peak(self) -> int:
        method = self._method
        if method == "cuda":
            return int(torch.cuda.max_memory_allocated(self._resource[1]))
        if method == "vmhwm":
            kib = _status_kib("VmHWM")
            return kib * 1024 if kib is not None else 0
        if method == "ru_maxrss":
            return _ru_maxrss_bytes() or 0
        return 0
