"""A decoder-only LM cut after block c: the client's bottom part and the main server's top part.

The client holds the embeddings and blocks [0, c); the main server holds blocks
[c, L), the final norm and the LM head (U-shaped: the norm and head stay on the
client, the server holds only blocks [c, L)). Each side trains the LoRA
parameters of its own modules.

Running a slice of blocks needs what ``LlamaModel.forward`` hands every decoder
layer: the causal/padding mask (`transformers.masking_utils.create_causal_mask`)
and the rotary position embeddings (the body's ``rotary_emb``). Both are
recomputed on each side from the attention mask, exactly as the unsplit forward
builds them, so split and unsplit computations give the same numbers (tested
in tests/test_split.py). Supported: Llama-family bodies (``embed_tokens``,
``layers``, ``norm``, ``rotary_emb``; Llama, Mistral, Qwen2 without sliding
windows, SmolLM2).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from transformers.masking_utils import create_causal_mask

from .data.tasks import IGNORE
from .flops import FlopCache
from .meter import ComputeMeter
from .models import backbone
from .train.adapter import State, adapter_state
from .train.graphed import GraphedFn, fast_path, pad_width, padded_width
from .train.local_steps import TrainSettings, clip_and_step, make_optimizer
from .train.losses import lm_loss_from_hidden, mean_token_loss

CLIENT, SERVER = "client", "server"

_MASK_PARAMS = set(inspect.signature(create_causal_mask).parameters)


def _causal_mask(config, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
    """`create_causal_mask` without a cache, across transformers 5.x spellings of its arguments.

    5.24 takes ``inputs_embeds`` and ``cache``; earlier 5.x releases take ``input_embeds``,
    ``past_key_values`` and ``cache_position``. Only the names this version knows are passed.
    """
    offered = {
        "config": config,
        "inputs_embeds": hidden,
        "input_embeds": hidden,
        "attention_mask": attention_mask,
        "cache": None,
        "past_key_values": None,
        "cache_position": torch.arange(hidden.shape[1], device=hidden.device),
        "position_ids": position_ids,
    }
    return create_causal_mask(**{k: v for k, v in offered.items() if k in _MASK_PARAMS})


# --------------------------------------------------------------------------- the cut


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a (PEFT-wrapped) causal LM; ValueError for bodies we cannot cut."""
    body = backbone(model)
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(body, a)]
    if missing:
        raise ValueError(
            f"federation.paradigm = 'split' needs a Llama-family model (its body has embed_tokens, layers, norm, "
            f"rotary_emb); {type(body).__name__} lacks {missing}."
        )
    return body.layers


def resolve_cut(cut_layer: int | None, num_layers: int) -> int:
    """The cut c (default L // 2), checked to satisfy 1 <= c < L so that both sides hold at least one block."""
    c = num_layers // 2 if cut_layer is None else cut_layer
    if not 1 <= c < num_layers:
        shown = f"{cut_layer!r}" if cut_layer is not None else f"None (default L // 2 = {c})"
        raise ValueError(
            f"split.cut_layer = {shown} is not allowed: the model has L = {num_layers} layers, so the cut must "
            f"satisfy 1 <= cut_layer < {num_layers} (clients hold blocks [0, c), the main server blocks [c, L)). "
            f"Pick a cut_layer between 1 and {num_layers - 1}."
        )
    return c


class Cut:
    """Where the model is cut, and which side owns each adapter key or parameter name.

    Names are classified by module path: blocks ``layers.i`` go to the client when
    i < c, the input embeddings to the client, and everything else (final norm,
    LM head) to the server, or to the client when U-shaped.
    """

    def __init__(self, model, cut_layer: int | None, *, u_shaped: bool = False) -> None:
        layers = decoder_layers(model)
        self.num_layers = len(layers)
        self.layer = resolve_cut(cut_layer, self.num_layers)
        self.u_shaped = u_shaped
        paths = {id(m): name for name, m in model.named_modules()}
        self._layers_prefix = paths[id(layers)] + "."
        self._embed_prefix = paths[id(backbone(model).embed_tokens)] + "."

    def side(self, name: str) -> str:
        """CLIENT or SERVER, for a PEFT state key or a parameter name of the wrapped model."""
        if name.startswith(self._layers_prefix):
            index = int(name[len(self._layers_prefix):].split(".", 1)[0])
            return CLIENT if index < self.layer else SERVER
        if name.startswith(self._embed_prefix):
            return CLIENT
        return CLIENT if self.u_shaped else SERVER

    def part(self, state: State, side: str) -> State:
        """The entries of an adapter state that `side` owns."""
        return {k: v for k, v in state.items() if self.side(k) == side}

    def params(self, model, side: str) -> list[torch.nn.Parameter]:
        """The trainable parameters that `side` owns (its optimizer's parameters)."""
        return [p for n, p in model.named_parameters() if p.requires_grad and self.side(n) == side]


# --------------------------------------------------------------------------- forward pieces


def compute_dtype(model) -> torch.dtype:
    """The dtype hidden states have inside the model (that of its base weights)."""
    return backbone(model).embed_tokens.weight.dtype


def run_blocks(model, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Decoder blocks [start, stop) on `hidden`, with the mask and rotary embeddings LlamaModel.forward builds."""
    body = backbone(model)
    # LlamaModel.forward without a cache: positions 0..seq-1 (right padding), then one mask and one
    # (cos, sin) pair shared by every block.
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = _causal_mask(body.config, hidden, attention_mask, position_ids)
    position_embeddings = body.rotary_emb(hidden, position_ids=position_ids)
    for layer in body.layers[start:stop]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                       position_ids=position_ids)
    return hidden


def bottom_forward(model, cut: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The client's part: embeddings and blocks [0, cut); returns the activations at the cut."""
    hidden = backbone(model).embed_tokens(input_ids)
    return run_blocks(model, hidden, attention_mask, 0, cut)


def top_forward(model, cut: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Blocks [cut, L) on the activations at the cut (no final norm)."""
    return run_blocks(model, hidden, attention_mask, cut, len(backbone(model).layers))


def head_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Final norm, LM head and the target-only LM loss, from the last block's output."""
    loss, _ = lm_loss_from_hidden(model, backbone(model).norm(hidden), labels)
    return loss


# --------------------------------------------------------------------------- the fast path's static steps
#
# Right-padded to a multiple of `graphed.BUCKET` tokens and run without an attention mask (causal attention
# alone: no real token attends to a pad), so they are captured as CUDA graphs (`fedtune.train.graphed`). What
# travels keeps the real width: the activations are cut back to it, the main server pads them again.


def static_bottom(model, cut: int):
    """``f(input_ids) -> activations at the cut`` of a right-padded batch, unmasked."""
    return lambda input_ids: bottom_forward(model, cut, input_ids, None)


def static_top_loss(model, cut: int):
    """``f(activations, labels) -> loss``: blocks [cut, L), the norm and the static LM loss, unmasked."""
    def loss(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        top = run_blocks(model, hidden, None, cut, len(backbone(model).layers))
        return mean_token_loss(model, backbone(model).norm(top), labels, static=True)
    return loss


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row is ones then zeros (what the static steps assume; one host synchronisation)."""
    m = attention_mask.bool()
    return not bool((m[:, 1:] & ~m[:, :-1]).any())


# --------------------------------------------------------------------------- the main server


class MainServer:
    """The main server of SplitFed: the top part of the model and its one optimizer.

    Its steps (`fedtune.split_session.Session` calls them, in process or inside the gRPC service):

    * ``forward_backward(activations, attention_mask, labels) -> (grad_at_cut, loss)``: one training step
      of the top part (standard split);
    * ``forward(activations, attention_mask) -> top_activations`` then ``backward(top_grad) -> grad_at_cut``:
      one step when U-shaped (the client holds the head and the labels);
    * ``state() -> adapter state`` of the top part, and ``take_compute() -> (flops, seconds)`` since the last call.

    Tensors come back in the dtype the activations came in (the wire dtype); the
    computation runs in the model's dtype. Every backward ends with a clipped
    optimizer step on the server's parameters only. One optimizer lives for the
    whole run and is shared by all clients, which are served one at a time
    (SplitFed V2: one top model, trained sequentially on every client's batches).

    Args:
        model: The PEFT model; only the parameters `cut` assigns to the server are trained here.
        cut: Where the model is cut.
        settings: Optimizer, learning rate, weight decay and gradient clipping.
        device: Where the model lives.
        count_flops: Count FLOPs of the server's work.
    """

    def __init__(self, model, cut: Cut, settings: TrainSettings, *, device: torch.device,
                 count_flops: bool = True) -> None:
        self.model = model
        self.cut = cut
        self.device = device
        self.max_grad_norm = settings.max_grad_norm
        self.params = cut.params(model, SERVER)
        self.optimizer = make_optimizer(self.params, settings)
        self.count_flops = count_flops
        self.flops = FlopCache(count_flops)  # counted once per (step kind, batch shape), then reused
        # The fast path (standard split): the top's forward and backward as per-shape CUDA graphs.
        static, graphs = fast_path(settings, device)
        self.top = (GraphedFn(static_top_loss(model, cut.layer), self.params, graphs=graphs, model=model,
                              name="split main server step") if static and not cut.u_shaped else None)
        self._seconds = 0.0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # U-shaped: (input leaf, top output)

    def forward_backward(self, activations: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Top forward, loss, backward and optimizer step; returns the gradient at the cut and the loss."""
        assert not self.cut.u_shaped, "U-shaped split uses forward() and backward()"
        if self.top is not None and right_padded(attention_mask):
            return self._static_step(activations, labels)
        with self._metered(("forward_backward", *activations.shape[:2], int((labels[:, 1:] != IGNORE).sum()))):
            x = self._leaf(activations)
            loss = head_loss(self.model, top_forward(self.model, self.cut.layer, x, attention_mask.to(self.device)),
                             labels.to(self.device, torch.long))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._step()
        return x.grad.to(activations.dtype), float(loss.detach())

    def forward(self, activations: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """U-shaped: blocks [c, L) on the activations; keeps the graph for `backward`."""
        assert self.cut.u_shaped, "standard split uses forward_backward()"
        assert self._pending is None, "forward() twice without backward()"
        with self._metered(("forward", *activations.shape[:2])):
            x = self._leaf(activations)
            out = top_forward(self.model, self.cut.layer, x, attention_mask.to(self.device))
        self._pending = (x, out)
        return out.detach().to(activations.dtype)

    def backward(self, top_grad: torch.Tensor) -> torch.Tensor:
        """U-shaped: backpropagate the gradient of the top activations, step; returns the gradient at the cut."""
        assert self._pending is not None, "backward() without forward()"
        x, out = self._pending
        self._pending = None
        with self._metered(("backward", *top_grad.shape[:2])):
            self.optimizer.zero_grad(set_to_none=True)
            out.backward(top_grad.to(self.device, out.dtype))
            self._step()
        return x.grad.to(top_grad.dtype)

    def abandon(self) -> None:
        """Drop a U-shaped forward whose client failed before sending its gradient (no step is taken)."""
        self._pending = None

    def state(self) -> State:
        """A copy of the server's adapter state (PEFT keys of blocks [c, L) and, unless U-shaped, the head)."""
        return self.cut.part(adapter_state(self.model), SERVER)

    def take_compute(self) -> tuple[int, float]:
        """FLOPs and seconds of the server's work since the last call."""
        out = (self.flops.take() or 0, self._seconds)
        self._seconds = 0.0
        return out

    # ------------------------------------------------------------------ internals

    def _static_step(self, activations: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """`forward_backward` on the fast path: padded to the static width, graphed, cut back to the real width."""
        b, width = activations.shape[:2]
        padded = padded_width(width)
        with self._metered(("forward_backward", b, padded)):
            x = pad_width(activations.to(self.device, compute_dtype(self.model)), padded, 0)
            x = x.detach().requires_grad_(True)
            loss = self.top(x, pad_width(labels.to(self.device, torch.long), padded, IGNORE))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._step()
            grad = x.grad[:, :width].to(activations.dtype, copy=True)
        return grad, float(loss.detach())

    def _leaf(self, activations: torch.Tensor) -> torch.Tensor:
        # The received activations start a fresh graph: gradients stop at the cut.
        return activations.to(self.device, compute_dtype(self.model)).detach().requires_grad_(True)

    def _step(self) -> None:
        clip_and_step(self.params, self.optimizer, self.max_grad_norm)

    @contextmanager
    def _metered(self, key: tuple):
        if not self.model.training:  # Module.train() walks every module: thousands of calls, each step
            self.model.train()
        meter = ComputeMeter(self.device, count_flops=False)
        with meter, self.flops.block(key):
            yield
        self._seconds += meter.seconds
