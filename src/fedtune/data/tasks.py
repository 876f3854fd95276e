"""Tasks: turning records into token sequences, and scoring the model on them.

A task formats a record as a prompt (through the tokenizer's chat template),
appends the target (a label word, or a reference response), and masks the
prompt out of the loss. Classification is scored from the next-token logits of
the label words at the end of the prompt; generation by greedy decoding.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100


@dataclass
class Example:
    """One tokenized example: the prompt ids, and the target ids the model must produce after it."""

    prompt_ids: list[int]
    target_ids: list[int]
    label: int | None = None  # classification: index into the task's label words
    reference: str | None = None  # generation: the reference text


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a prompt template uses."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


class Task:
    """Shared prompt formatting for both task kinds."""

    kind = "base"

    def __init__(
        self,
        tokenizer,
        prompt: str,
        *,
        system_prompt: str | None,
        use_chat_template: bool,
        max_length: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.system_prompt = system_prompt
        self.use_chat_template = use_chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.max_length = max_length
        self.fields = template_fields(prompt)

    def prompt_text(self, record: dict[str, Any]) -> str:
        user = self.prompt.format_map({k: str(v) for k, v in record.items()})
        if not self.use_chat_template:
            return user
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": user})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=not self.use_chat_template)["input_ids"]

    def encode_prompt(self, record: dict[str, Any]) -> Example:
        """The prompt alone, with no target (a public, unlabeled example for distillation)."""
        return Example(self._ids(self.prompt_text(record))[-self.max_length :], [])

    def _fit(self, prompt_ids: list[int], target_ids: list[int]) -> tuple[list[int], list[int]]:
        # Keep the end of the prompt: the question and the answer position matter more than its start.
        room = self.max_length - len(target_ids)
        if room < 1:
            target_ids = target_ids[: self.max_length - 1]
            room = 1
        return prompt_ids[-room:], target_ids


class ClassificationTask(Task):
    """A prompt plus label words; accuracy from the next-token logits of the label words."""

    kind = "classification"

    def __init__(self, tokenizer, prompt: str, label_words: list[str], label_map: dict[str, str] | None, **kw) -> None:
        super().__init__(tokenizer, prompt, **kw)
        self.label_words = list(label_words)
        self.label_map = label_map  # raw label (as str) -> word; None when raw labels are words
        probe = self.prompt_text({f: "" for f in self.fields})
        probe_ids = self._ids(probe)
        self.label_token_ids: list[list[int]] = []
        for w in self.label_words:
            ids = self._ids(probe + w)
            # Tokenize the word in context (after the assistant prefix), as the model would produce it.
            if ids[: len(probe_ids)] != probe_ids:
                ids = probe_ids + self.tokenizer(w, add_special_tokens=False)["input_ids"]
            self.label_token_ids.append(ids[len(probe_ids):])
        firsts = [t[0] for t in self.label_token_ids]
        if len(set(firsts)) != len(firsts):
            dup = [w for w, f in zip(self.label_words, firsts) if firsts.count(f) > 1]
            raise ValueError(
                f"data.label_words {dup} start with the same token, so the next-token score cannot tell them apart: "
                "choose label words that differ in their first token."
            )
        self.first_token_ids = firsts

    def label_index(self, raw: Any, where: str) -> int:
        key = str(raw)
        word = self.label_map.get(key) if self.label_map is not None else key
        if word is None or word not in self.label_words:
            allowed = list(self.label_map) if self.label_map is not None else self.label_words
            raise ValueError(
                f"{where}: label {raw!r} is not one of the configured labels {allowed}: fix the data or add it to "
                "data.label_words."
            )
        return self.label_words.index(word)

    def encode(self, record: dict[str, Any], label_field: str, where: str = "record") -> Example:
        label = self.label_index(record[label_field], where)
        prompt_ids, target = self._fit(self._ids(self.prompt_text(record)), self.label_token_ids[label])
        return Example(prompt_ids, list(target), label=label)


class GenerationTask(Task):
    """Instruction -> response; scored by exact match or ROUGE-L of greedy decodes."""

    kind = "generation"

    def __init__(self, tokenizer, prompt: str, metric: str, max_new_tokens: int, **kw) -> None:
        super().__init__(tokenizer, prompt, **kw)
        self.metric = metric
        self.max_new_tokens = max_new_tokens
        self.eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(self, record: dict[str, Any], response_field: str, where: str = "record") -> Example:
        reference = str(record[response_field])
        target = self.tokenizer(reference, add_special_tokens=False)["input_ids"] + self.eos_ids
        prompt_ids, target = self._fit(self._ids(self.prompt_text(record)), target)
        return Example(prompt_ids, target, reference=reference)

    def score(self, prediction: str, reference: str) -> float:
        if self.metric == "exact_match":
            return float(normalize(prediction) == normalize(reference))
        return rouge_l(prediction, reference)


# --------------------------------------------------------------------------- scores


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and collapse spaces (SQuAD-style answer normalization)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(text.split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two texts on normalized word tokens (longest common subsequence)."""
    p, r = normalize(prediction).split(), normalize(reference).split()
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- batching


def collate(examples: list[Example], pad_id: int, with_target: bool = True) -> dict[str, torch.Tensor]:
    """Right-pad a batch. ``labels`` hold the target ids (IGNORE elsewhere); ``last`` the last prompt position."""
    seqs = [e.prompt_ids + (e.target_ids if with_target else []) for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    last = torch.empty(len(seqs), dtype=torch.long)
    for i, (s, e) in enumerate(zip(seqs, examples)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        n = len(e.prompt_ids)
        last[i] = n - 1
        if with_target:
            labels[i, n : len(s)] = torch.tensor(e.target_ids)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "last": last}
    if examples and examples[0].label is not None:
        batch["label"] = torch.tensor([e.label for e in examples])
    return batch

