"""A PEFT model's trainable adapter state, in and out, fast.

State travels under PEFT's own key names (`peft.get_peft_model_state_dict`); loading checks the
key set exactly (missing or unexpected keys are errors, never skipped) and copies in place, so the
parameters keep their addresses and optimizers and CUDA graphs built over them stay valid.

In simulation every client of a round loads the same global state into one shared model, and on a
GPU a round's worth of small host-device copies costs more than training. So the parameters behind
each key are found once per model, copies to the host go through one buffer (pinned and
asynchronous on CUDA), and the last host-to-device transfer is reused while its tensors are unchanged.
The caches are weak maps keyed by the model: they go when the model goes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from ..strategies import packed
from ..wire import WireError

State = dict[str, torch.Tensor]


_ADAPTER_PARAMS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.nn.Parameter] | None]" = (
    weakref.WeakKeyDictionary())


def adapter_params(model) -> dict[str, torch.nn.Parameter] | None:
    """The adapter's trainable state: key -> the parameter that holds it, found once per model.

    The keys are PEFT's state-dict names, for the entries that train (FFA-LoRA's frozen A stays home).
    When PEFT's saved entries are not the parameters themselves (prompt learning saves the virtual tokens'
    embeddings, which P-tuning computes from its prompt encoder), the keys are the trainable parameters'
    own names: what trains is what travels. ``get_peft_model_state_dict`` walks the whole model's state
    dict (~100 ms a call on the 135M model on a CPU core), which would cost more than a client's training
    steps on a GPU, hence the cache.
    """
    if model in _ADAPTER_PARAMS:
        return _ADAPTER_PARAMS[model]
    by_address = {p.data_ptr(): p for p in model.parameters() if p.numel()}
    state = get_peft_model_state_dict(model)
    found = {k: by_address.get(v.data_ptr()) for k, v in state.items()}
    if any(p is None or p.shape != state[k].shape for k, p in found.items()):
        params = {k: p for k, p in model.named_parameters() if p.requires_grad} or None
    else:
        params = {k: p for k, p in found.items() if p.requires_grad}
    _ADAPTER_PARAMS[model] = params
    return params


def cpu_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of device tensors in one transfer (one synchronisation instead of one per tensor)."""
    if not tensors or tensors[0].device.type == "cpu" or len({t.dtype for t in tensors}) != 1:
        return [t.detach().to("cpu", copy=True) for t in tensors]
    # Views of the one CPU buffer: no per-tensor copies (wire.encode copies views that share storage).
    return unflatten(torch.cat([t.detach().reshape(-1) for t in tensors]).cpu(), tensors)


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of `flat` shaped like each tensor of `like`, in order (the inverse of concatenating them)."""
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in like]), like)]


_ON_DEVICE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _on_device(model, src: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """`src` on the device in one host-to-device transfer, reusing the last transfer for `model`.

    Every client of a round loads the same global state; in simulation those are the same tensor
    objects, so one transfer serves the whole round. Tensors are matched by identity and version
    counter (an in-place change of a tensor invalidates the copy).
    """
    key = [(t, t._version) for t in src]
    last = _ON_DEVICE.get(model)
    if last is not None and len(last[0]) == len(key) and all(
            a is b and va == vb for (a, va), (b, vb) in zip(last[0], key)) and last[1].device == device:
        flat = last[1]
    else:
        whole = packed(src)  # the state is one buffer already (an aggregate): no concatenation on the host
        flat = (whole if whole is not None else torch.cat([t.reshape(-1) for t in src])).to(device, dtype)
        _ON_DEVICE[model] = (key, flat)
    return unflatten(flat, src)


def adapter_state(model) -> State:
    """A detached CPU copy of the model's trainable adapter state (PEFT key names).

    On the CPU, not the GPU: a simulation keeps every reply of a round (and the global state) until it
    aggregates, and with hundreds of clients those copies would otherwise cost more GPU memory than training.
    """
    params = adapter_params(model)
    if params is None:
        return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
    return dict(zip(params, cpu_copies(list(params.values()))))


def pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a CUDA tensor in pinned memory, queued on the stream (valid once the stream reaches it)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def adapter_snapshot(model) -> tuple[State, Callable[[], None]]:
    """Like `adapter_state`, without waiting for the device: returns the state and a function to call first.

    On a GPU the parameters are copied into one pinned host buffer asynchronously, in stream order, so
    later work (the next client loading its own adapter into the same parameters) may be queued at once;
    the returned tensors hold the values only after the returned function has waited for the copy.
    Elsewhere this is `adapter_state` and the function does nothing.
    """
    params = adapter_params(model)
    tensors = list(params.values()) if params is not None else []
    if not tensors or tensors[0].device.type != "cuda" or len({t.dtype for t in tensors}) != 1:
        return adapter_state(model), lambda: None
    flat = pinned_copy(torch.cat([t.detach().reshape(-1) for t in tensors]))
    copied = torch.cuda.Event()  # also covers every copy queued before this call (stream order)
    copied.record()
    return dict(zip(params, unflatten(flat, tensors))), copied.synchronize


def load_adapter_state(model, state: State, expected: set[str] | None = None, what: str = "adapter") -> None:
    """Copy `state` into the model's adapter; missing or unexpected keys are errors, never skipped.

    ``expected`` narrows the keys `state` must have to part of the adapter (split learning loads one side).
    The copy is in place, so the parameters keep their addresses (optimizers and CUDA graphs stay valid).
    """
    params = adapter_params(model)
    if expected is None:
        expected = set(params) if params is not None else set(get_peft_model_state_dict(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise WireError(f"{what} state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    if params is None:
        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise WireError(f"adapter state has keys the model lacks: {unexpected[:3]}")
        return
    keys = sorted(state)
    for k in keys:
        if tuple(state[k].shape) != tuple(params[k].shape):
            raise WireError(f"{what} state {k!r} has shape {tuple(state[k].shape)}, the model's is "
                            f"{tuple(params[k].shape)}")
    dst = [params[k] for k in keys]
    src = [state[k] for k in keys]
    device = dst[0].device
    if device.type != "cpu" and src[0].device.type == "cpu" and len({t.dtype for t in src}) == 1:
        src = _on_device(model, src, device, dst[0].dtype)
    with torch.no_grad():
        torch._foreach_copy_(dst, [t.to(p.device, p.dtype) for p, t in zip(dst, src)])

