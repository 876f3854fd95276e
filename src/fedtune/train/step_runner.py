"""A client's local training steps, fast on a GPU: one CUDA graph per batch shape, replayed.

A small model at a small batch is launch-bound on a GPU: the step is thousands of
tiny kernels, each launched from Python through transformers and peft, and the
GPU waits on the CPU (plain transformers + peft reach ~1% of an H100 on the 135M
model at batch 4). `StepRunner` removes that overhead without changing the math:

* **static shapes**: a batch is right-padded to a bucket (a multiple of
  ``bucket`` tokens) and run without an attention mask. With right padding and a
  causal mask, a real token never attends to a pad token, so every real token's
  output, the loss and the gradients are those of the masked, unpadded batch;
  pad positions carry no label. The LM head runs on every position (a static
  shape), and the loss is the mean over the target tokens, counted on the device.
* **CUDA graphs** (CUDA only): the first batch of each (batch, bucket) shape is
  captured once as a graph of the whole step (forward, loss, backward, gradient
  clipping, the optimizer step); every later batch of that shape is copied into
  the graph's input buffers and replayed: one launch instead of thousands, no
  host-device synchronisation per step. Warm-up and capture run on a snapshot of
  the adapter and optimizer state, which is restored, so capturing changes no
  result. Graphs share one memory pool.
* **buffers reused across clients**: clients of a simulation share one model
  and one runner; `reset` starts a client (loads nothing, zeroes the optimizer
  state in place: equivalent to a fresh optimizer), so the graphs stay valid.
* **mixed precision**: a bf16/fp16 base runs under autocast of its dtype, so
  the fp32 adapters' matmuls use the same tensor cores; the master adapter
  weights and the optimizer state stay fp32.

FLOPs are counted on real steps: each shape's step is counted once, eagerly,
under ``FlopCounterMode`` during its warm-up, and multiplied by the steps run
with that shape (padding included: it is work the GPU really does).

On the CPU (and with ``graphs=False``) the step is the eager, masked one, so the
test suite and CPU runs are unchanged; ``static=True`` runs the static step without
graphs on any device (the CPU tests check the captured math that way).

The trainable tensors, the loss and the clipping are pluggable, so other passes get
the same machinery: `fedtune.train.stacked_lora` trains K clients' stacked LoRA through one
runner, with a loss that records one mean per client and a per-client clip.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from ..data.tasks import IGNORE, collate
from ..flops import FlopCache
from ..meter import ComputeMeter
from ..models import backbone
from ..peft_methods import graph_safe
from .local_steps import TrainSettings, clip_and_step, make_optimizer
from .losses import lm_loss, proximal_term, static_loss


def pad_to_bucket(batch: dict[str, torch.Tensor], bucket: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` and ``labels`` to the next multiple of `bucket` tokens (labels padded with IGNORE)."""
    width = batch["input_ids"].shape[1]
    target = max(bucket, math.ceil(width / bucket) * bucket)
    extra = target - width
    return {
        "input_ids": F.pad(batch["input_ids"], (0, extra), value=pad_id),
        "labels": F.pad(batch["labels"], (0, extra), value=IGNORE),
    }


def _clip_all(params: list[torch.Tensor], max_norm: float) -> None:
    """Clip the gradient of all `params` together by its total norm (capturable: foreach, no host sync)."""
    torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True if params and params[0].is_cuda else None)


class StepRunner:
    """Runs the local steps of the clients that share one model (see the module docstring).

    Args:
        model: The PEFT model; its trainable parameters are the adapter (unless ``params`` says otherwise).
        make_optimizer: Builds the optimizer over a parameter list (``capturable`` is added on CUDA).
        max_grad_norm: Clip each step's gradient to this norm (None: no clipping).
        prox_mu: FedProx coefficient (0: none).
        device: Where the model lives.
        pad_id: The tokenizer's pad id.
        graphs: Use static shapes and CUDA graphs; default: on CUDA.
        bucket: Sequence lengths are padded up to a multiple of this in the static path.
        static: Use the static-shape step (right-padded, unmasked, `loss`) even without graphs; default:
            ``graphs``. The static step without graphs runs on any device: it is how the CPU tests check
            the math that the graphs capture.
        params: The trainable tensors the optimizer, clipping and FedProx act on; default: the model's
            parameters that require a gradient.
        loss: The static step's loss, ``loss(model, input_ids, labels)``, returning the scalar to minimise,
            or a pair (scalar to minimise, tensor recorded as the step's loss); default: `static_loss`.
            It must not synchronise with the host (it is captured in the graph).
        clip: ``clip(params, max_norm)`` clips the gradients in place; default: one norm over all ``params``
            (`torch.nn.utils.clip_grad_norm_`).
        correction: Keep one buffer per parameter (`correction`) added to every clipped gradient (SCAFFOLD).
    """

    def __init__(self, model, make_optimizer, *, max_grad_norm: float | None, prox_mu: float,
                 device: torch.device, pad_id: int, graphs: bool | None = None, bucket: int = 64,
                 count_flops: bool = True, compile: bool = False, static: bool | None = None,
                 params: list[torch.Tensor] | None = None, loss: Callable | None = None,
                 clip: Callable[[list[torch.Tensor], float], Any] | None = None, correction: bool = False) -> None:
        self.model = model
        self.params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.device = torch.device(device)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; set train.cuda_graphs: false on the CPU.")
        self.static = self.graphs if static is None else static
        if self.graphs and not self.static:
            raise ValueError("CUDA graphs need the static-shape step: static=False and graphs=True conflict.")
        if loss is not None and not self.static:
            raise ValueError("a custom loss is a static-shape loss: it needs static=True (or graphs=True).")
        self.optimizer = make_optimizer(self.params, capturable=self.graphs)
        self.max_grad_norm = max_grad_norm
        self.prox_mu = prox_mu
        self.pad_id = pad_id
        self.bucket = bucket
        self.count_flops = count_flops
        self._loss_eager = loss or static_loss
        # torch.compile fuses the elementwise work (norms, rotary, activations, LoRA scaling) of the static
        # step; one compilation per batch shape, then captured in the graph like the eager kernels.
        self._loss = torch.compile(self._loss_eager, dynamic=False) if compile else self._loss_eager
        self._clip = clip or _clip_all
        self.anchor = [torch.zeros_like(p) for p in self.params] if prox_mu > 0 else None
        # SCAFFOLD's c - c_i, added to each clipped gradient; static buffers a client fills before its steps.
        self.correction = [torch.zeros_like(p) for p in self.params] if correction else None
        dtypes = {p.dtype for p in backbone(model).parameters() if not p.requires_grad}
        low = [d for d in dtypes if d in (torch.bfloat16, torch.float16)]
        self.autocast_dtype = low[0] if low and self.device.type == "cuda" else None
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
        self._flops_per_shape: dict[tuple[int, int], int] = {}
        self._pool = None
        self._graph_failed: str | None = None
        self._losses: list[torch.Tensor] = []
        self._eager_flops = FlopCache(count_flops)  # the eager path: counted once per (batch, width, targets)
        self.flops = 0

    # ------------------------------------------------------------------ per client

    def reset(self, keep_optimizer: bool = False) -> None:
        """Start a client's local training: fresh optimizer state (zeroed in place) and the anchor for FedProx."""
        if not keep_optimizer:
            state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            if state:
                torch._foreach_zero_(state)
        if self.anchor is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.anchor, self.params)
        self._losses = []
        self.flops = 0

    def step(self, examples) -> None:
        """One optimizer step on a list of examples; the loss stays on the device until `losses`."""
        batch = collate(examples, self.pad_id)
        if not self.static:
            self._eager_step(batch)
            return
        self.step_static(pad_to_bucket(batch, self.bucket, self.pad_id))

    def step_static(self, static: dict[str, torch.Tensor]) -> None:
        """One optimizer step on a right-padded batch (``input_ids`` and ``labels``, CPU or device tensors).

        The first batch of each shape is captured (with graphs); later ones are copied into the
        graph's inputs and replayed. Nothing here waits for the device.
        """
        shape = tuple(static["input_ids"].shape)
        if self.graphs and shape not in self._graphs and self._graph_failed is None:
            self._capture(shape, static)
        if shape in self._graphs:
            graph, inputs, loss = self._graphs[shape]
            for k, v in static.items():
                # From pinned memory the copy is asynchronous; from pageable memory CUDA would first wait
                # for the stream to drain, leaving the GPU idle while the host prepares the next batch.
                inputs[k].copy_(v.pin_memory() if v.device.type == "cpu" else v, non_blocking=True)
            graph.replay()
            self._losses.append(loss.detach().clone())
        elif self.count_flops and shape not in self._flops_per_shape:
            # Not captured (no graphs, or capture failed): count this shape's FLOPs on its first real step.
            self._counted_step(shape, static, record=True)
        else:
            self._static_step(static, record=True)
        self.flops += self._flops_per_shape.get(shape, 0)

    @property
    def captured_shapes(self) -> int:
        """How many batch shapes run as a captured CUDA graph."""
        return len(self._graphs)

    @property
    def graph_failure(self) -> str | None:
        """Why capture failed (the steps then run eagerly), or None."""
        return self._graph_failed

    def last_loss(self) -> float:
        """The last step's loss (synchronises with the device)."""
        return float(self._losses[-1])

    def losses(self) -> list[float]:
        """The losses of the steps since `reset` (one host synchronisation)."""
        return self.loss_tensor().tolist()

    def loss_tensor(self) -> torch.Tensor:
        """The losses of the steps since `reset` as one float32 tensor on the device (no synchronisation)."""
        if not self._losses:
            return torch.zeros(0)
        return torch.stack([x.float() for x in self._losses])

    # ------------------------------------------------------------------ internals

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _finish_step(self, loss: torch.Tensor) -> None:
        total = loss + proximal_term(self.params, self.anchor, self.prox_mu) if self.anchor is not None else loss
        total.backward()
        clip_and_step(self.params, self.optimizer, self.max_grad_norm, self._clip, self.correction)

    def _static_loss(self, ids: torch.Tensor, labels: torch.Tensor, eager: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(the scalar to minimise, what the step records as its loss) of the static step."""
        with self._autocast():
            out = (self._loss_eager if eager else self._loss)(self.model, ids, labels)
        return out if isinstance(out, tuple) else (out, out)

    def _eager_step(self, batch: dict[str, torch.Tensor]) -> None:
        # The head runs on the target positions only: their count is part of what fixes the step's FLOPs.
        key = (*batch["input_ids"].shape, int((batch["labels"][:, 1:] != IGNORE).sum()))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.optimizer.zero_grad(set_to_none=True)
        with self._eager_flops.block(key):
            with self._autocast():
                loss, _ = lm_loss(self.model, batch)
            self._finish_step(loss)
        self._losses.append(loss.detach())
        self.flops += self._eager_flops.take() or 0

    def _static_step(self, static: dict[str, torch.Tensor], record: bool, eager: bool = False) -> torch.Tensor:
        ids, labels = (static[k].to(self.device, non_blocking=True) for k in ("input_ids", "labels"))
        self.optimizer.zero_grad(set_to_none=True)
        # FLOPs are counted on the eager step: the same math, and what FlopCounterMode can see.
        objective, loss = self._static_loss(ids, labels, eager)
        self._finish_step(objective)
        if record:
            self._losses.append(loss.detach())
        return loss

    def _counted_step(self, shape: tuple[int, int], static: dict[str, torch.Tensor], record: bool) -> None:
        """One eager static step under FlopCounterMode; its FLOPs become this shape's count per step."""
        meter = ComputeMeter(self.device, count_flops=True)
        with meter:
            self._static_step(static, record=record, eager=True)
        self._flops_per_shape[shape] = int(meter.flops or 0)

    def _snapshot(self):
        params = [p.detach().clone() for p in self.params]
        state = {id(p): {k: (t.clone() if torch.is_tensor(t) else t) for k, t in s.items()}
                 for p, s in self.optimizer.state.items()}
        return params, state

    def _restore(self, snap) -> None:
        params, state = snap
        with torch.no_grad():
            for p, saved in zip(self.params, params):
                p.copy_(saved)
            for p, s in self.optimizer.state.items():
                for k, t in s.items():
                    if not torch.is_tensor(t):
                        continue
                    if id(p) in state:
                        t.copy_(state[id(p)][k])
                    else:
                        t.zero_()  # no state before the warm-up: back to a fresh optimizer

    def _capture(self, shape: tuple[int, int], example: dict[str, torch.Tensor]) -> None:
        """Warm up and capture the step for one batch shape, leaving the adapter and optimizer as they were."""
        snap = self._snapshot()
        inputs = {k: v.to(self.device).clone() for k, v in example.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                # Warm-up steps (cuBLAS workspaces, autograd buffers, the optimizer's state);
                # the first one is also where this shape's FLOPs are counted.
                for i in range(3):
                    if i == 0 and self.count_flops:
                        self._counted_step(shape, inputs, record=False)
                    else:
                        self._static_step(inputs, record=False)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                objective, loss = self._static_loss(inputs["input_ids"], inputs["labels"], eager=False)
                self._finish_step(objective)
            self._graphs[shape] = (graph, inputs, loss)
        except RuntimeError as err:  # an op that cannot be captured: run this model's steps eagerly
            self._graph_failed = f"{type(err).__name__}: {err}"
            warnings.warn(f"CUDA graph capture failed, running static eager steps instead: {self._graph_failed}",
                          stacklevel=2)
            torch.cuda.synchronize(self.device)
        finally:
            self._restore(snap)


def make_runner(model, s: TrainSettings, *, device: torch.device, pad_id: int) -> StepRunner:
    """The step runner clients of one shared model use (CUDA graphs on CUDA unless turned off, or unless the
    PEFT method is not plain LoRA: `fedtune.peft_methods.graph_safe`; those steps run eagerly, with a warning)."""
    cuda = torch.device(device).type == "cuda"
    if cuda and (s.cuda_graphs or s.compile) and not graph_safe(model):
        warnings.warn("train.cuda_graphs / train.compile apply to plain LoRA (lora, rslora, ffa_lora); this "
                      "peft.method runs its steps eagerly.", stacklevel=2)
        cuda = False
    return StepRunner(model, lambda params, capturable: make_optimizer(params, s, capturable),
                      max_grad_norm=s.max_grad_norm, prox_mu=s.prox_mu, device=device, pad_id=pad_id,
                      graphs=s.cuda_graphs and cuda, count_flops=s.count_flops, compile=s.compile and cuda,
                      correction=s.control_variates)
