"""What a client's local training needs besides the model: its settings, the optimizer, the one
clip-then-step, the order of its batches and the seeds of a round."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..data.tasks import Example


@dataclass
class TrainSettings:
    """What a client needs to know to train locally (plain values, no config object)."""

    local_steps: int | None
    local_epochs: float | None
    batch_size: int
    lr: float
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    prox_mu: float = 0.0
    control_variates: bool = False
    """SCAFFOLD: the runner adds a per-parameter correction to every gradient (`fedtune.scaffold`)."""
    count_flops: bool = True
    cuda_graphs: bool = True
    compile: bool = False
    static_steps: bool | None = None
    """KD and split: run the static-shape steps of the fast path (`fedtune.train.graphed`); None: on CUDA with
    ``cuda_graphs``. True on the CPU runs them without graphs (how the tests check their math)."""

    def steps_for(self, num_examples: int) -> int:
        if self.local_steps is not None:
            return self.local_steps
        return max(1, math.ceil(self.local_epochs * num_examples / self.batch_size))


def make_optimizer(params: list[torch.Tensor], s: TrainSettings, capturable: bool = False) -> torch.optim.Optimizer:
    """The client optimizer; ``capturable`` keeps its state on the device so a CUDA graph can replay its step."""
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, weight_decay=s.weight_decay)
    if capturable:
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, capturable=True, foreach=True)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def batches(examples: list[Example], batch_size: int, steps: int, rng: random.Random):
    """`steps` batches drawn by walking shuffled epochs of `examples` (a short last batch is skipped)."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, len(examples)):
            order = list(range(len(examples)))
            rng.shuffle(order)
        take, order = order[:batch_size], order[batch_size:]
        yield [examples[i] for i in take]


def round_seed(seed: int, rnd: int, node: int) -> int:
    """The 32-bit seed of (run seed, round, node): what every per-round generator starts from.

    Seeded so that results do not depend on the order clients run in (node -1: the server).
    """
    return hash((seed, rnd, node)) & 0xFFFFFFFF


def round_rng(seed: int, rnd: int, node: int) -> tuple[random.Random, int]:
    """A client's batch-order generator for one round, and the torch seed it trains under (dropout).

    The batched runtime (`fedtune.paradigms.fedpeft_batched`) draws the very same batches from it.
    """
    rng = random.Random(round_seed(seed, rnd, node))
    return rng, rng.getrandbits(62)


def clip_and_step(params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, max_grad_norm: float | None,
                  clip: Callable[[Sequence[torch.Tensor], float], object] | None = None,
                  correction: Sequence[torch.Tensor] | None = None) -> None:
    """Clip the gradients of `params` to `max_grad_norm` (one norm over all; none when unset) and step.

    ``clip`` replaces the one-norm clipping (batched clients clip each client's slices by its own norm).
    ``correction`` (one tensor per parameter) is added to the clipped gradients: SCAFFOLD's ``c - c_i``.
    """
    if max_grad_norm:
        (clip or torch.nn.utils.clip_grad_norm_)(params, max_grad_norm)
    if correction is not None:
        torch._foreach_add_([p.grad for p in params], list(correction))
    optimizer.step()


def settings_from(config, *, prox_mu: float = 0.0) -> TrainSettings:
    """The `TrainSettings` of a config's ``train`` section (``prox_mu``: FedProx's coefficient, 0 for none)."""
    t = config.train
    return TrainSettings(
        local_steps=t.local_steps, local_epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
        optimizer=t.optimizer, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, prox_mu=prox_mu,
        count_flops=t.count_flops, cuda_graphs=t.cuda_graphs, compile=t.compile,
    )
