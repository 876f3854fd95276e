"""Loss functions shared by every paradigm (written once, tested once)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.tasks import IGNORE
from .models import backbone


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states of the transformer body (no LM head), shape (batch, seq, hidden)."""
    return backbone(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, position) indices whose hidden state predicts a target token, and those tokens.

    Position t predicts token t+1, so a target at t+1 selects the hidden state at t.
    """
    nxt = labels[:, 1:]
    rows, cols = (nxt != IGNORE).nonzero(as_tuple=True)
    return (rows, cols), nxt[rows, cols]


def lm_loss_from_hidden(
    model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Token-level cross-entropy of the target tokens, averaged over the batch's target tokens.

    The LM head runs only on the positions that predict a target: with a 49k
    vocabulary the full logits tensor would cost more than the rest of a small model.
    """
    (rows, cols), targets = target_positions(labels)
    if targets.numel() == 0:
        raise ValueError("a training batch has no target tokens: data.max_length is too short for the prompts.")
    logits = model.get_output_embeddings()(hidden[rows, cols]).float()
    return F.cross_entropy(logits, targets, reduction="mean"), int(targets.numel())


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Causal-LM loss on a collated batch (see `fedtune.data.tasks.collate`)."""
    h = hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return lm_loss_from_hidden(model, h, batch["labels"])


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
    logits = last @ head.weight[ids].T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[ids]
    return logits.float()
