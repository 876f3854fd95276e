"""QLoRA's frozen base: the Linear layers of a loaded model quantized to 4-bit NF4 or 8-bit (``model.quantization``).

The float model is built or loaded on the host as usual, then each Linear layer (the LM head too; a tied
input embedding reads the quantized head) becomes a bitsandbytes ``Linear4bit`` (NF4, Dettmers et
al. 2023, "QLoRA") or ``Linear8bitLt`` (LLM.int8()) whose weights are quantized as they move to the GPU,
so the GPU never holds the float weights. `peft` then wraps those layers with LoRA as it does any
bitsandbytes model. In simulation the quantized base is the one shared base of every client.

bitsandbytes is an optional dependency (``pip install fedtune[qlora]``) and its kernels need CUDA: on a
CPU the error says so before anything is loaded.
"""

from __future__ import annotations

import copy

import torch

KINDS = ("none", "nf4", "int8")


def check_available(kind: str, device: torch.device) -> None:
    """ValueError when `kind` cannot run here: not CUDA, or bitsandbytes missing."""
    if kind not in KINDS:
        raise ValueError(f"model.quantization = {kind!r} is not allowed: choose one of {', '.join(KINDS)}.")
    if kind == "none":
        return
    if device.type != "cuda":
        raise ValueError(f"model.quantization = {kind!r} needs CUDA (bitsandbytes' 4- and 8-bit kernels run on "
                         f"NVIDIA GPUs), but the model is on {device}: set model.quantization=none, or run on a GPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"model.quantization = {kind!r} needs bitsandbytes: pip install 'fedtune[qlora]'.") from None


class TiedQuantizedEmbedding(torch.nn.Module):
    """The input embedding of a model whose embedding is tied to its (quantized) LM head: each looked-up row is
    dequantized from the head's weight, so the one quantized matrix serves both (as the float one did).

    The head owns the weight (and saves it); this module holds no parameter of its own.
    """

    def __init__(self, head: torch.nn.Module, dtype: torch.dtype, padding_idx: int | None) -> None:
        super().__init__()
        object.__setattr__(self, "_head", head)  # not a submodule: its weight belongs to the head
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype, self.padding_idx = dtype, padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb
        import torch.nn.functional as F

        w = self._head.weight
        state = getattr(w, "quant_state", None)
        if state is None:  # LLM.int8(): int8 rows times their absmax / 127 (the layer keeps them after a forward)
            scb = w.SCB if w.SCB is not None else self._head.state.SCB
            return (F.embedding(ids, w.data).to(self.dtype) * (F.embedding(ids, scb.view(-1, 1)) / 127.0)
                    ).to(self.dtype)
        if self.embedding_dim % state.blocksize:
            return F.embedding(ids, bnb.functional.dequantize_4bit(w.data, state)).to(self.dtype)
        # NF4: gather the packed rows and their blocks' absmax, dequantize those rows only.
        packed = w.data.view(torch.uint8).view(self.num_embeddings, self.embedding_dim // 2)
        blocks = self.embedding_dim // state.blocksize
        rows = copy.copy(state)
        rows.absmax = F.embedding(ids, state.absmax.view(self.num_embeddings, blocks)).view(-1)
        rows.shape = torch.Size((*ids.shape, self.embedding_dim))
        return bnb.functional.dequantize_4bit(F.embedding(ids, packed).view(-1, 1), rows).to(self.dtype)


def quantize_linears(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every Linear layer of `model` (the LM head included) by its bitsandbytes quantized form on `device`.

    A tied input embedding becomes a `TiedQuantizedEmbedding` that reads the quantized head: on the 1B
    shape the embedding is a fifth of the weights, so leaving it in bf16 would keep the base at 0.45 of its
    bf16 size. Returns the number of layers quantized. The float weights are read from wherever they are
    (the host, normally) and quantized on their way to `device`; the rest of the model is not moved.
    """
    check_available(kind, device)
    import bitsandbytes as bnb

    tied = getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for name, linear in targets:
        # Int8Params quantizes only on a move from the host; Params4bit on any move.
        weight = (linear.weight.data.to("cpu", torch.float16) if kind == "int8"
                  else linear.weight.data.to(compute_dtype))
        bias = linear.bias is not None
        if kind == "nf4":
            # Plain (not double-quantized) block scales: the tied embedding gathers them by row.
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                    compress_statistics=False, quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=False)
        else:
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                      threshold=6.0, device="meta")
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if bias:
            new.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        new = new.to(device)  # quantizes the weight
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    if tied:
        old = model.get_input_embeddings()
        model.set_input_embeddings(TiedQuantizedEmbedding(model.get_output_embeddings(), compute_dtype,
                                                          getattr(old, "padding_idx", None)))
        del old
    # What transformers records for a model loaded quantized (peft and Trainer read these flags).
    flag = "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit"
    setattr(model, flag, True)
    return len(targets)


def base_bytes(model: torch.nn.Module) -> int:
    """Bytes of the base model's frozen weights as stored (quantized layers at their packed size, with their scales)."""
    total, seen = 0, set()
    for module in model.modules():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if not t.requires_grad and t.data_ptr() not in seen:  # tied weights once
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:  # NF4's per-block absmax (and nested quantization constants)
            for v in vars(state).values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
        scb = getattr(getattr(module, "weight", None), "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if torch.is_tensor(scb):  # LLM.int8()'s per-row scales
            total += scb.numel() * scb.element_size()
    return total
