"""The fast path of the paradigms whose steps do not fit `StepRunner`: KD's and split learning's.

`fedtune.train.step_runner.StepRunner` captures a whole client step (forward, loss, backward, optimizer)
as one CUDA graph. KD's round mixes steps of two losses on one optimizer (distillation toward soft labels,
then private training), and split learning cuts a step in two, with a network exchange between the
bottom's forward and its backward. Both use `GraphedFn` instead: the same machinery for any
differentiable function of static-shape tensors.

* **static shapes** (`static_ids`, `pad_width`): batches are right-padded to a multiple of ``bucket``
  tokens and run without an attention mask; with right padding and causal attention no real token sees
  a pad token, so every real position's output, the losses and the gradients are those of the masked,
  unpadded batch (tested on the CPU, where the static path runs without graphs).
* **per-shape graphs** (CUDA): the first call of each input shape runs eagerly (that is where
  `fedtune.flops.FlopCache` counts its FLOPs, once per shape), the second captures the forward and the
  backward as two CUDA graphs (`torch.cuda.make_graphed_callables`, its own memory pool), later calls
  replay them: one launch each instead of hundreds. Capture runs its warm-ups through
  ``torch.autograd.grad``, so it changes no parameter and no ``.grad``. A call under ``torch.no_grad`` is
  captured as a forward-only graph (inference).
* the optimizer step stays eager (foreach AdamW, a handful of kernels): the callers keep their optimizers,
  their state and their checkpoints exactly as on the eager path.

Nothing in a replayed step waits for the host: the callers keep their losses as device tensors and read
them once per round.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data.tasks import IGNORE

BUCKET = 64
"""Static sequence lengths are multiples of this many tokens (as `StepRunner`'s default)."""


def fast_path(settings, device: torch.device) -> tuple[bool, bool]:
    """(static shapes, CUDA graphs) for a client's steps: both on CUDA with ``train.cuda_graphs``, neither on the
    CPU unless ``settings.static_steps`` asks for the static step (the CPU tests of the fast path's math)."""
    graphs = bool(settings.cuda_graphs) and torch.device(device).type == "cuda"
    static = graphs if getattr(settings, "static_steps", None) is None else bool(settings.static_steps) or graphs
    return static, graphs


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a CPU tensor bound for CUDA goes through pinned memory, so the copy does not wait for
    the GPU to drain (a copy from pageable memory would)."""
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def shared(model, key, make: Callable):
    """The object ``make()`` built once per (model, key): what every client of a simulation (they share one model)
    and the server use, so graphs are captured once and each shape's FLOPs counted once."""
    cache = model.__dict__.setdefault("_fedtune_graphed", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


def flop_counts(model) -> dict:
    """The per-key FLOP counts shared by every `fedtune.flops.FlopCache` of the fast path on `model`: a graphed
    shape replays where FlopCounterMode sees nothing, so a shape is counted once, by whoever runs it first."""
    return shared(model, "flop_counts", dict)


def padded_width(width: int, bucket: int = BUCKET) -> int:
    """The static length of a batch `width` tokens wide: the next multiple of `bucket`."""
    return max(bucket, math.ceil(width / bucket) * bucket)


def pad_width(t: torch.Tensor, width: int, value: float | int = 0) -> torch.Tensor:
    """Right-pad dimension 1 of `t` to `width` with `value` (a no-op when it is that wide)."""
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 2) + [0, extra]
    return F.pad(t, pad, value=value)


def static_ids(batch: dict[str, torch.Tensor], bucket: int = BUCKET) -> dict[str, torch.Tensor]:
    """A collated batch right-padded to a multiple of `bucket` tokens: ``input_ids`` (pad id taken from the
    batch's own padding convention: 0 where the mask is 0 is fine, no real token attends to it) and ``labels``."""
    width = padded_width(batch["input_ids"].shape[1], bucket)
    out = {"input_ids": pad_width(batch["input_ids"], width, 0)}
    if "labels" in batch:
        out["labels"] = pad_width(batch["labels"], width, IGNORE)
    return out


class _Bound(torch.nn.Module):
    """`fn` as a module whose parameters are exactly `params` (what make_graphed_callables differentiates)."""

    def __init__(self, fn: Callable, params: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.__dict__["_fn"] = fn  # not a submodule: the model's own modules and buffers stay out of sight
        self.__dict__["_params"] = tuple(params)

    def parameters(self, recurse: bool = True):  # noqa: ARG002
        return iter(self._params)

    def forward(self, *args):
        return self._fn(*args)


class GraphedFn:
    """``fn(*tensors)`` with per-shape CUDA graphs of its forward and backward (see the module docstring).

    Args:
        fn: A function of tensors only, returning a tensor or a tuple of tensors; it must not synchronise with
            the host (no ``.item()``, no data-dependent shapes) and must read the model only through `params`
            and constants.
        params: The trainable tensors fn's gradient flows to (their ``.grad`` accumulates on ``backward``).
        graphs: Capture CUDA graphs (False: every call runs ``fn`` eagerly).
        name: Names this function in the warning when a capture fails (its calls then stay eager).
        model: When given, its train/eval mode is part of a graph's key (dropout).
    """

    def __init__(self, fn: Callable, params: Sequence[torch.Tensor], *, graphs: bool, name: str = "step",
                 model: torch.nn.Module | None = None) -> None:
        self.fn, self.params, self.graphs, self.name, self.model = fn, list(params), graphs, name, model
        self._seen: set = set()
        self._captured: dict = {}
        self.failure: str | None = None

    def key(self, args: Sequence[torch.Tensor]) -> tuple:
        """What a graph depends on: grad mode, and every argument's shape, dtype and requires_grad."""
        mode = self.model.training if self.model is not None else None
        return (torch.is_grad_enabled(), mode, *((tuple(a.shape), a.dtype, a.requires_grad) for a in args))

    @property
    def captured(self) -> int:
        """How many shapes run as captured graphs."""
        return len(self._captured)

    def __call__(self, *args: torch.Tensor):
        if not self.graphs or self.failure is not None:
            return self.fn(*args)
        key = self.key(args)
        graphed = self._captured.get(key)
        if graphed is None:
            if key not in self._seen:  # a shape's first call runs eagerly: FlopCache counts it there
                self._seen.add(key)
                return self.fn(*args)
            graphed = self._capture(key, args)
            if graphed is None:
                return self.fn(*args)
        return graphed(*args)

    def _capture(self, key: tuple, args: Sequence[torch.Tensor]):
        samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        module = _Bound(self.fn, self.params if torch.is_grad_enabled() else ())
        try:
            graphed = torch.cuda.make_graphed_callables(module, samples, allow_unused_input=True)
        except RuntimeError as err:  # an op that cannot be captured: this function's calls stay eager
            self.failure = f"{type(err).__name__}: {err}"
            warnings.warn(f"CUDA graph capture of {self.name} failed, running it eagerly: {self.failure}",
                          stacklevel=3)
            torch.cuda.synchronize()
            return None
        self._captured[key] = graphed
        return graphed
