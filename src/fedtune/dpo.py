"""Direct preference optimisation (Rafailov et al. 2023), written once for the server's CAI step and the
federated DPO clients.

For a prompt x with a preferred answer y_w and a dispreferred one y_l, a policy pi and a frozen reference:

    loss = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

where log pi(y|x) is the sum of the answer tokens' log-probabilities (`sequence_logps`). The implicit
rewards ``beta * (log pi - log ref)`` of each answer are reported beside it, as trl's DPOTrainer does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.tasks import IGNORE, Example, collate


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean DPO loss over a batch of sequence log-probabilities, and the chosen / rejected implicit rewards."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the log-probabilities of each sample's target tokens (``labels != IGNORE``), shape (batch,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    token = torch.gather(F.log_softmax(logits, -1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(-1)


def pair_batch(chosen: list[Example], rejected: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    """One collated batch: the chosen examples first, then the rejected ones (one forward for both)."""
    return {k: v.to(device) for k, v in collate(chosen + rejected, pad_id).items()}


def pair_logps(model, chosen: list[Example], rejected: list[Example], pad_id: int, device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log pi(chosen), log pi(rejected))`` of each pair under `model` as it is."""
    logps = sequence_logps(model, pair_batch(chosen, rejected, pad_id, device))
    return logps[: len(chosen)], logps[len(chosen):]
