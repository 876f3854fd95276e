"""SCAFFOLD (Karimireddy et al., 2020, Algorithm 1), the clients' side; the server's is `strategies.Scaffold`.

A client holds a control variate ``c_i`` (one float32 tensor per adapter tensor, zero at first). In a round it
receives the global adapter ``x`` and the server's control variate ``c``, and every local step descends along
``g + c - c_i`` instead of the gradient ``g`` (added after gradient clipping, so the correction is exact:
`fedtune.train.local_steps.clip_and_step`). After its K steps of learning rate lr, ending at ``y``, it updates
its control variate by the paper's option II,

    c_i+ = c_i - c + (x - y) / (K * lr),

and replies ``y`` and ``delta c_i = c_i+ - c_i`` (so the payload doubles, both ways). ``(x - y) / (K lr)`` is
the mean corrected gradient only when the local optimizer is SGD, so SCAFFOLD needs ``train.optimizer: sgd``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .strategies import CONTROL
from .train.adapter import adapter_params

State = dict[str, torch.Tensor]


def split(payload: Mapping[str, torch.Tensor]) -> tuple[State, State]:
    """``(adapter, control)`` of a SCAFFOLD message (control keys lose their `CONTROL` prefix)."""
    adapter = {k: t for k, t in payload.items() if not k.startswith(CONTROL)}
    control = {k[len(CONTROL):]: t for k, t in payload.items() if k.startswith(CONTROL)}
    return adapter, control


def set_correction(runner, model, c: Mapping[str, torch.Tensor], c_i: Mapping[str, torch.Tensor]) -> None:
    """Load ``c - c_i`` into the runner's correction buffers (one per trainable parameter, in its order)."""
    if runner.correction is None:
        raise AssertionError("the step runner was built without correction buffers (TrainSettings.control_variates)")
    params = adapter_params(model)
    if params is None:
        raise ValueError("federation.strategy = 'scaffold' needs an adapter whose every tensor is a model parameter "
                         "(LoRA): this model's PEFT state is not.")
    name = {id(p): k for k, p in params.items()}
    with torch.no_grad():
        for buf, p in zip(runner.correction, runner.params):
            k = name[id(p)]
            buf.copy_((c[k].float() - c_i[k].float()).to(buf.device, buf.dtype))


def option_two(c_i: Mapping[str, torch.Tensor], c: Mapping[str, torch.Tensor], x: Mapping[str, torch.Tensor],
               y: Mapping[str, torch.Tensor], steps: int, lr: float) -> State:
    """The client's new control variate, ``c_i - c + (x - y) / (steps * lr)`` (float32)."""
    if steps < 1 or not lr > 0:
        raise ValueError(f"option II needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    return {k: c_i[k].float() - c[k].float() + (x[k].float() - y[k].float()) / (steps * lr) for k in x}
