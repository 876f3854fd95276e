"""QLoRA's frozen base: the Linear layers of a loaded model quantized to 4-bit NF4 or 8-bit (``model.quantization``).

The float model is built or loaded on the host as usual, then each Linear layer of the transformer body
(not the LM head, which is tied to the embeddings) becomes a bitsandbytes ``Linear4bit`` (NF4, Dettmers et
al. 2023, "QLoRA") or ``Linear8bitLt`` (LLM.int8()) whose weights are quantized as they move to the GPU,
so the GPU never holds the float weights. `peft` then wraps those layers with LoRA as it does any
bitsandbytes model. In simulation the quantized base is the one shared base of every client.

bitsandbytes is an optional dependency (``pip install fedtune[qlora]``) and its kernels need CUDA: on a
CPU the error says so before anything is loaded.
"""

from __future__ import annotations

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


def quantize_linears(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device,
                     skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every Linear layer of `model` (but `skip`) by its bitsandbytes quantized form on `device`.

    Returns the number of layers quantized. The float weights are read from wherever they are (the host,
    normally) and quantized on their way to `device`; the rest of the model is not moved.
    """
    check_available(kind, device)
    import bitsandbytes as bnb

    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not any(name.endswith(s) for s in skip)]
    for name, linear in targets:
        weight = linear.weight.data.to("cpu", torch.float16 if kind == "int8" else compute_dtype)
        bias = linear.bias is not None
        if kind == "nf4":
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                    quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                      threshold=6.0, device="meta")
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if bias:
            new.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        new = new.to(device)  # quantizes the weight
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
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
        if torch.is_tensor(scb):  # LLM.int8()'s per-row scales
            total += scb.numel() * scb.element_size()
    return total
