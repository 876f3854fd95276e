"""The losses every paradigm trains with, written once and tested once.

The one token-level loss is `mean_token_loss`: next-token cross-entropy averaged over a batch's
target tokens (``labels != IGNORE``), optionally per group of samples (several clients' samples in
one batched pass, each client's mean over its own targets). It has two ways to run the LM head:

* gathered (default): the head runs only on the positions that predict a target: with a 49k
  vocabulary the full logits tensor would cost more than the rest of a small model;
* static: the head runs on every position and the mean is taken with fixed shapes, on the device:
  nothing synchronises with the host, so a CUDA graph can capture it (`fedtune.train.step_runner`).

Both give the same loss (tested); every other loss (`lm_loss`, the step runner's static loss, the
batched clients' losses, split learning's head loss) is this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.tasks import IGNORE
from ..models import backbone
from ..peft_methods import is_prompt_learning, prompt_hidden_states


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Last hidden states of the transformer body (no LM head), shape (batch, seq, hidden).

    A prompt-learning adapter's virtual tokens take part (`fedtune.peft_methods.prompt_hidden_states`);
    the states returned are the input's positions either way.
    """
    if is_prompt_learning(model):
        return prompt_hidden_states(model, backbone(model), input_ids, attention_mask)
    return backbone(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, position) indices whose hidden state predicts a target token, and those tokens.

    Position t predicts token t+1, so a target at t+1 selects the hidden state at t.
    """
    nxt = labels[:, 1:]
    rows, cols = (nxt != IGNORE).nonzero(as_tuple=True)
    return (rows, cols), nxt[rows, cols]


def mean_token_loss(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *, static: bool = False,
                    groups: int | None = None, sample_group: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens, from the last hidden states.

    Args:
        model: The causal LM (its output embeddings are the head).
        hidden: ``(batch, seq, hidden)``, after the final norm.
        labels: ``(batch, seq)`` target ids, IGNORE elsewhere.
        static: Run the head on every position with fixed shapes (no host synchronisation).
        groups: Return one mean per group of samples, shape ``(groups,)``, instead of a scalar. Static:
            the batch is ``groups`` equal, contiguous blocks of samples. Gathered: ``sample_group`` says
            the group of each sample; a group without targets gets 0.
        sample_group: ``(batch,)`` group index of each sample (gathered path with ``groups``).

    Raises:
        ValueError: The gathered path found no target token (prompts longer than ``data.max_length``).
    """
    head = model.get_output_embeddings()
    if static:
        logits = head(hidden[:, :-1]).float()
        nxt = labels[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), nxt.reshape(-1), ignore_index=IGNORE,
                             reduction="none")
        k = groups or 1
        means = ce.view(k, -1).sum(1) / (nxt != IGNORE).reshape(k, -1).sum(1).clamp(min=1)
        return means if groups else means[0]
    (rows, cols), targets = target_positions(labels)
    if targets.numel() == 0:
        raise ValueError("a training batch has no target tokens: data.max_length is too short for the prompts.")
    logits = head(hidden[rows, cols]).float()
    if not groups:
        return F.cross_entropy(logits, targets)
    ce = F.cross_entropy(logits, targets, reduction="none")
    slot = sample_group[rows]
    sums = torch.zeros(groups, dtype=ce.dtype, device=ce.device).index_add(0, slot, ce)
    return sums / torch.bincount(slot, minlength=groups).clamp(min=1)


def lm_loss_from_hidden(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor
                        ) -> tuple[torch.Tensor, int]:
    """`mean_token_loss` (gathered) and the number of target tokens it averaged over."""
    return mean_token_loss(model, hidden, labels), int((labels[:, 1:] != IGNORE).sum())


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Causal-LM loss on a collated batch (see `fedtune.data.tasks.collate`)."""
    h = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return lm_loss_from_hidden(model, h, batch["labels"])


def static_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`mean_token_loss` of a right-padded batch with static shapes: no attention mask (causal attention
    alone: right padding never reaches a real token), the head on every position, no host synchronisation."""
    return mean_token_loss(model, hidden_states(model, input_ids), labels, static=True)


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: (mu / 2) * ||w - w_global||^2 over the trainable parameters."""
    total = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
    return 0.5 * mu * total


def label_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor], token_ids: list[int]) -> torch.Tensor:
    """Next-token logits of the label words' first tokens at the end of each prompt, shape (batch, labels)."""
    h = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    last = h[torch.arange(h.shape[0], device=h.device), batch["last"]]
    head = model.get_output_embeddings()
    ids = torch.tensor(token_ids, device=h.device)
    if not head.weight.is_floating_point():  # a quantized head (QLoRA): its rows are packed, so run it whole
        return head(last)[:, ids].float()
    logits = last @ head.weight[ids].T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[ids]
    return logits.float()
