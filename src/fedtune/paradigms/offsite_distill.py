"""Offsite-tuning's distilled emulator: the model owner trains the layer-dropped middle to mimic the full one.

Uniform layer drop keeps a few of the middle blocks; the hidden state that reaches the emulator's top blocks
is then far from the one the full model's top blocks see, so adapters trained on the emulator learn to
repair that damage and do not transfer (docs/paradigms-beyond-backprop.md). Offsite-tuning (Xiao et al.,
2023) distils the compressed middle first, on public text the model owner holds. Here the owner (the
server) does, before it sends the emulator:

  1. the text (`distill_text`): continuations the full model samples itself from the fixed start of the
     task's prompt template (``data.prompt`` up to its first field), seeded; no client data, no test data;
  2. the target: the full model's hidden state entering its first top block (block ``L - top``), with no
     adapter; the student's: the emulator's hidden state entering *its* first top block. Both models share
     the embeddings and the bottom blocks, so the two states differ only by the middle;
  3. ``offsite.distill_steps`` AdamW steps at ``offsite.distill_lr`` on the mean squared error between the
     two, updating the emulator's kept middle blocks only (the bottom and top blocks stay the model's, so
     adapters still plug into the full model by name).

`distil_middle` returns the new emulator weights and what it cost: server FLOPs (counted once per batch
shape, `fedtune.flops.FlopCache`), seconds, the loss curve and the MSE on held-out samples before and after.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..flops import FlopCache
from ..train.adapter import State


class _Stop(Exception):
    """Raised by the capture hook: nothing after the captured block needs to run."""


def hidden_before(model, index: int, input_ids: torch.Tensor) -> torch.Tensor:
    """The hidden state entering block ``index`` of a (plain or LoRA-wrapped) causal LM; stops the forward there."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    got: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        got.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handle = inner.model.layers[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        inner.model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0]


def prompt_prefix(prompt: str | None) -> str:
    """The fixed start of a prompt template (before its first ``{field}``): public, it holds no example."""
    return (prompt or "").split("{", 1)[0]


def distill_text(model, tokenizer, prefix: str, count: int, length: int, seed: int,
                 device: torch.device, batch_size: int = 16) -> torch.Tensor:
    """(count, length) token ids: `prefix` and the full model's own sampled continuation, no adapter, seeded."""
    start = tokenizer(prefix, add_special_tokens=True)["input_ids"] if prefix else []
    if not start:
        start = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    start = start[: max(1, length // 2)]
    new = length - len(start)
    out = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else _Null()
        with adapter_off, torch.no_grad():
            for i in range(0, count, batch_size):
                n = min(batch_size, count - i)
                ids = torch.tensor([start] * n, device=device)
                if new > 0:
                    ids = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                         top_p=0.95, temperature=1.0, max_new_tokens=new, min_new_tokens=new,
                                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
                out.append(ids[:, :length].cpu())
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat(out)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def middle_mse(teacher, student, ids: torch.Tensor, teacher_index: int, student_index: int,
               batch_size: int, device: torch.device) -> float:
    """Mean squared error between the teacher's hidden state entering block `teacher_index` and the student's
    entering block `student_index`, over every position of `ids`."""
    total, count = 0.0, 0
    off = teacher.disable_adapter() if hasattr(teacher, "disable_adapter") else _Null()
    with off, torch.no_grad():
        for i in range(0, len(ids), batch_size):
            x = ids[i: i + batch_size].to(device)
            t = hidden_before(teacher, teacher_index, x).float()
            s = hidden_before(student, student_index, x).float()
            total += float(((s - t) ** 2).sum())
            count += t.numel()
    return total / max(count, 1)


def distil_middle(teacher, student, *, middle: list[int], teacher_index: int, student_index: int,
                  train_ids: torch.Tensor, held_ids: torch.Tensor | None, steps: int, lr: float,
                  batch_size: int, seed: int, device: torch.device, count_flops: bool = True) -> dict[str, Any]:
    """Train `student`'s blocks `middle` (a plain causal LM, in place) for `steps` AdamW steps so its hidden
    state entering block `student_index` matches `teacher`'s entering block `teacher_index` (MSE).

    The teacher's targets are computed once per training row. Returns the cost and the effect:
    ``flops`` (teacher targets and student steps, None when not counted), ``seconds`` (the same work, not
    the held-out scoring), ``losses`` (per step)
    and, with `held_ids`, ``mse_before`` and ``mse_after`` on those rows.
    """
    flops = FlopCache(count_flops)
    before = middle_mse(teacher, student, held_ids, teacher_index, student_index, batch_size, device) \
        if held_ids is not None else None
    started = time.perf_counter()
    off = teacher.disable_adapter() if hasattr(teacher, "disable_adapter") else _Null()
    targets = []
    with off, torch.no_grad():
        for i in range(0, len(train_ids), batch_size):
            x = train_ids[i: i + batch_size].to(device)
            with flops.block(("teacher", *x.shape)):
                targets.append(hidden_before(teacher, teacher_index, x).detach())
    targets_all = torch.cat(targets)
    for p in student.parameters():
        p.requires_grad_(False)
    blocks = student.model.layers
    params = [p for j in middle for p in blocks[j].parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(seed)
    losses = []
    student.train()
    for _ in range(steps):
        rows = torch.randperm(len(train_ids), generator=rng)[:batch_size]
        x, t = train_ids[rows].to(device), targets_all[rows.to(targets_all.device)]
        with flops.block(("student", *x.shape)):
            s = hidden_before(student, student_index, x)
            loss = torch.nn.functional.mse_loss(s.float(), t.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        losses.append(float(loss.detach()))
    student.eval()
    for p in params:
        p.requires_grad_(False)
    seconds = time.perf_counter() - started
    after = middle_mse(teacher, student, held_ids, teacher_index, student_index, batch_size, device) \
        if held_ids is not None else None
    return {"flops": flops.total, "seconds": seconds, "losses": losses,
            "mse_before": before, "mse_after": after}


def weights_of(student, like: State) -> State:
    """The student's weights under the names (and dtypes) of `like`, the emulator's weight dict."""
    state = student.state_dict()
    return {k: state[k].detach().to(v.dtype).clone() for k, v in like.items()}
