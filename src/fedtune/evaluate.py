"""Scoring the global model on held-out data."""

from __future__ import annotations

import torch

from .data.tasks import ClassificationTask, Example, GenerationTask, collate
from .train.losses import label_scores


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, task, examples: list[Example], *, batch_size: int, device: torch.device, pad_id: int) -> float:
    """The task's score (accuracy, exact match or ROUGE-L) of `model` on `examples`, in [0, 1]."""
    was_training = model.training
    model.eval()
    # Batches of similar length waste less compute on padding; the score does not depend on order.
    examples = sorted(examples, key=lambda e: len(e.prompt_ids))
    try:
        if isinstance(task, ClassificationTask):
            return _accuracy(model, task, examples, batch_size, device, pad_id)
        assert isinstance(task, GenerationTask)
        return _generation(model, task, examples, batch_size, device, pad_id)
    finally:
        model.train(was_training)


def _accuracy(model, task: ClassificationTask, examples, batch_size, device, pad_id) -> float:
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = _to(collate(chunk, pad_id, with_target=False), device)
        scores = label_scores(model, batch, task.first_token_ids)
        correct += int((scores.argmax(-1) == batch["label"]).sum())
    return correct / max(len(examples), 1)


def _generation(model, task: GenerationTask, examples, batch_size, device, pad_id) -> float:
    total = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        width = max(len(e.prompt_ids) for e in chunk)
        # Left padding so every prompt ends at the same column and decoding continues from there.
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, e in enumerate(chunk):
            ids[j, width - len(e.prompt_ids) :] = torch.tensor(e.prompt_ids)
            mask[j, width - len(e.prompt_ids) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=task.max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=task.eos_ids or None,
        )
        texts = task.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        total += sum(task.score(t, e.reference or "") for t, e in zip(texts, chunk))
    return total / max(len(examples), 1)
